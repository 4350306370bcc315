"""``X-Request-Id``: every request has an id, sent back on its response and written in its log
lines, so an operator can find the request a user reports.

* The client's ``X-Request-Id`` is kept when it is 1 to :data:`MAX_LENGTH` characters of
  :data:`ALLOWED` (UUIDs, ``req-...`` ids, trace ids); anything else (spaces, quotes, line
  breaks: a forged log line) is replaced by a new ``req-<32 hex>`` id, as is a missing one.
* :class:`RequestIds` (the outermost middleware, so that refusals and preflights have one too)
  adds the header to every response and writes one access line per request when it ends
  (logger ``gateway.access``: id, client, method, path, status, seconds), in place of uvicorn's
  own access log.
* :class:`RequestIdFilter` on a log handler prefixes ``[<id>]`` to every line logged while a
  request is served (errors included); the CLI installs it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any
from urllib.parse import quote

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
MAX_LENGTH = 128
#: what a kept id may be made of: nothing that can break a log line or a header
ALLOWED = re.compile(rf"[A-Za-z0-9._:=+/-]{{1,{MAX_LENGTH}}}")

access_logger = logging.getLogger("gateway.access")

_current: ContextVar[str | None] = ContextVar("request_id", default=None)


def current() -> str | None:
    """The id of the request being served (None outside a request)."""
    return _current.get()


def new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def accepted(given: str | None) -> str:
    """The client's id if it is a safe one, else a new one."""
    return given if given is not None and ALLOWED.fullmatch(given) else new_id()


class RequestIds:
    """ASGI middleware: the request's id in ``scope["state"]["request_id"]``, on the response,
    in the log lines (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"]
                      if k.lower() == b"x-request-id"), None)
        request_id = accepted(given)
        scope.setdefault("state", {})["request_id"] = request_id
        # Not reset at the end: Starlette's error middleware, outside this one, logs an
        # unhandled error after this call has unwound.  Each request runs in its own task,
        # with its own copy of the context, so the id never leaks into another request.
        _current.set(request_id)
        started = time.perf_counter()
        status = 500  # an error before the response starts is a 500 to the client

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _access_line(scope, request_id, status, time.perf_counter() - started)


def _access_line(scope: Scope, request_id: str, status: int, seconds: float) -> None:
    client = scope.get("client")
    where = f"{client[0]}:{client[1]}" if client else "-"
    # quoted as uvicorn does: a decoded path may hold line breaks
    path = quote(scope.get("root_path", "") + scope["path"])
    access_logger.info('%s %s "%s %s HTTP/%s" %d %.3fs', request_id, where, scope["method"],
                       path, scope.get("http_version", "1.1"), status, seconds,
                       extra={"request_id": request_id})


class RequestIdFilter(logging.Filter):
    """Prefixes ``[<request id>]`` to a line logged while a request is served (a line that
    names its id itself, like the access line, is left as it is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _current.get()
        if request_id is not None and getattr(record, "request_id", None) is None:
            record.request_id = request_id
            # ids hold no '%', so the message's own %-formatting is untouched
            record.msg = f"[{request_id}] {record.msg}"
        return True


def install_log_filter(logger: Any = None) -> None:
    """Put :class:`RequestIdFilter` on the handlers of ``logger`` (the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
