"""Run an ASGI app on a REAL uvicorn server on 127.0.0.1 (a free port) for end-to-end tests.

The server runs in a background thread of the test process, so tests can inspect in-process
objects (such as a fake model's counters) while real HTTP clients talk to it over TCP.
:func:`gateway_process` runs the ``serve`` command itself in a subprocess instead.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

STARTUP_TIMEOUT = 10.0
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def gateway_process(*flags: str, env: Mapping[str, str] | None = None,
                    timeout: float = 120) -> Iterator[str]:
    """``python -m gateway serve --port PORT *flags`` until the block ends; yields the base URL
    once ``/ready`` says 200.  Stopped with SIGTERM; its output must hold no traceback."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), *flags],
        cwd=REPO, env=None if env is None else dict(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.stdout is not None
    with proc.stdout:
        log = proc.stdout.read()
    assert "Traceback" not in log, log


@contextmanager
def running_server(app: Any, *, timeout: float = STARTUP_TIMEOUT,
                   wait_ready: bool = False) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields the base URL (``http://127.0.0.1:PORT``).

    ``wait_ready``: also wait (within ``timeout``) until ``GET /ready`` says 200, i.e. the
    models the app loads in the background after start-up are in.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2,
        # The plain asyncio loop and h11 keep the test independent of optional extras.
        loop="asyncio", http="h11",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server stopped during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test server did not start within {timeout} s")
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port}"
        while wait_ready and httpx.get(f"{url}/ready", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test server was not ready within {timeout} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
