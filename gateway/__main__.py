"""``python -m gateway`` == the ``chatglm-gateway`` command."""

from gateway.cli import main

raise SystemExit(main())
