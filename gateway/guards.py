"""What a request must pass before any route sees it: size limits and browser safety.

A pure ASGI middleware (it wraps ``receive`` to count body bytes as they arrive, so nothing is
buffered and streams pass through untouched):

* **Headers**: at most :data:`MAX_HEADERS` headers of at most :data:`MAX_HEADER_BYTES` together,
  else 431.
* **Body**: at most ``max_request_bytes``: a larger ``Content-Length`` is a 413 before a byte is
  read; a chunked body is cut off with a 413 once it passes the limit.
* **Origin** (CSRF from web pages): a state-changing request (anything but GET, HEAD, OPTIONS)
  that carries an ``Origin`` header must come from the gateway's own origin or one of
  ``cors_origins``, else 403.  Without this any page a user visits could make a local gateway
  generate with a "simple" cross-origin POST (no preflight); Ollama refuses such origins too.
* **Host** (DNS rebinding): while the server is bound to a loopback address, the ``Host`` header
  must name a loopback address or ``localhost``, or be in ``allowed_hosts``, else 421: a
  rebinding page reaches 127.0.0.1 under its own host name.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError

logger = logging.getLogger(__name__)

MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestRefused(GatewayError):
    """A request stopped at the door (its status is set per case)."""

    error_type = "invalid_request_error"

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message, code=code)
        self.status_code = status


def is_loopback(host: str) -> bool:
    """Whether a bind address or a Host name is this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """``Host`` without its port (``[::1]:8000`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class RequestGuard:
    def __init__(self, app: ASGIApp, *, max_request_bytes: int, bind_host: str,
                 cors_origins: Iterable[str] = (), allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.check_host = is_loopback(bind_host)
        self.cors_origins = frozenset(cors_origins)
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._refusal(scope)
        if refused is not None:
            logger.info("refused %s %s: %s", scope["method"], scope["path"], refused.message)
            await refused.response()(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    # a GatewayError: the route reading the body answers 413 through the
                    # error handlers, before its response starts
                    raise self._too_large()
            return message

        await self.app(scope, counted_receive, send)

    def _too_large(self) -> RequestRefused:
        return RequestRefused(413, f"The request body is larger than {self.max_request_bytes} "
                              "bytes.", "request_too_large")

    def _refusal(self, scope: Scope) -> RequestRefused | None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) \
                > MAX_HEADER_BYTES:
            return RequestRefused(431, f"Too many or too large headers (at most {MAX_HEADERS}, "
                                  f"{MAX_HEADER_BYTES} bytes).", "headers_too_large")
        values = _headers(headers)
        length = values.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            return self._too_large()
        host = values.get("host", "")
        if self.check_host and host and not is_loopback(_host_name(host)) \
                and host.lower() not in self.allowed_hosts \
                and _host_name(host).lower() not in self.allowed_hosts:
            return RequestRefused(421, f"Host '{host}' is not served here (the gateway is bound "
                                  "to a loopback address; allow the name with --allowed-host).",
                                  "host_not_allowed")
        origin = values.get("origin")
        if origin is not None and scope["method"] not in _SAFE_METHODS \
                and not self._origin_allowed(origin, scope, host):
            return RequestRefused(403, f"Requests from origin '{origin}' are not allowed "
                                  "(allow it with --cors-origin).", "origin_not_allowed")
        return None

    def _origin_allowed(self, origin: str, scope: Scope, host: str) -> bool:
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        scheme = scope.get("scheme", "http")
        return bool(host) and origin.lower() == f"{scheme}://{host}".lower()


def _headers(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
