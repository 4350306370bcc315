"""Run an ASGI app on a REAL uvicorn server on 127.0.0.1 (a free port) for end-to-end tests.

The server runs in a background thread of the test process, so tests can inspect in-process
objects (such as a fake model's counters) while real HTTP clients talk to it over TCP.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

STARTUP_TIMEOUT = 10.0


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
