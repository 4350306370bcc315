"""docker-compose.yml and the Dockerfile agree with the command line they drive.

(No Docker engine runs on the CI machines, so the image itself is not built here; these checks
catch a compose file or entrypoint that the gateway's CLI would reject.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gateway import cli

REPO = Path(__file__).resolve().parent.parent


def _entrypoint() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    match = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert match, "Dockerfile has no exec-form ENTRYPOINT"
    return list(json.loads(match.group(1)))


def test_every_compose_service_is_a_valid_serve_command() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    entry = _entrypoint()
    assert entry[:2] == ["chatglm-gateway", "serve"]
    services = compose["services"]
    assert {"gateway", "gateway-gpu"} <= set(services)
    for name, service in services.items():
        args = cli.build_parser().parse_args(entry[1:] + service["command"])
        assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000, name
        assert str(args.config) == "/config.toml", name
        assert any(v.startswith("./config.toml:/config.toml") for v in service["volumes"]), name
        assert any(v.endswith(":/models:ro") for v in service["volumes"]), name
        assert "/ready" in " ".join(service["healthcheck"]["test"]), name
        assert "CHATGLM_GATEWAY_API_KEYS" in service["environment"], name
    assert services["gateway"].get("profiles") is None  # the CPU service runs by default
    assert services["gateway-gpu"]["profiles"] == ["gpu"]
    assert "--device" in services["gateway-gpu"]["command"]


def test_dockerfile_pins_torch_before_the_package() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert text.index('pip install --no-cache-dir "${TORCH_SPEC}"') < text.index(
        "pip install --no-cache-dir .")
    assert "ARG TORCH_SPEC=torch==" in text
