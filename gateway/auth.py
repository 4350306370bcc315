"""Bearer API keys: ASGI middleware in front of every route except the open ones.

Open without a key: ``/health`` and ``/ready`` (probes), the web page (``GET /``) and its
``/static/`` assets (the page asks the user for the key and sends it on its API calls), and CORS
preflights (``OPTIONS``: browsers never send credentials on them; the CORS middleware, outside
this one, answers them).  Everything else (``/v1/*``, ChatGLM's ``POST /``, ``/metrics``,
``/docs``) needs ``Authorization: Bearer KEY``.  No key configured = no check at all.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from gateway.errors import Unauthorized

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})
OPEN_PREFIXES = ("/static/",)
PAGE_METHODS = frozenset({"GET", "HEAD"})


def is_open(method: str, path: str) -> bool:
    if method == "OPTIONS" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return True
    return path == "/" and method in PAGE_METHODS


def key_matches(given: str, keys: Sequence[bytes]) -> bool:
    """Compare against every key in constant time per key (no early exit on a match)."""
    candidate = given.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


def check(authorization: str | None, keys: Sequence[bytes]) -> None:
    """Raise :class:`Unauthorized` (OpenAI's wording) unless the header holds a valid key."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    if not key_matches(token, keys):
        raise Unauthorized(f"Incorrect API key provided: {_redacted(token)}.")


def _redacted(token: str) -> str:
    # OpenAI shows the first and last characters only; never log or echo a whole key.
    return f"{token[:3]}***{token[-4:]}" if len(token) > 8 else "***"


class ApiKeyAuth:
    """ASGI middleware; a 401 is OpenAI's error body with code ``invalid_api_key``."""

    def __init__(self, app: Any, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = tuple(k.encode("utf-8") for k in keys)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.keys or is_open(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        raw = headers.get(b"authorization")
        try:
            check(raw.decode("latin-1") if raw is not None else None, self.keys)
        except Unauthorized as err:
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(host: str, keys: Sequence[str]) -> None:
    if not keys and not is_loopback(host):
        logger.warning(
            "No API key configured and the server listens on %s: anyone who can reach it can "
            "use the models. Set --api-key, --api-key-file or CHATGLM_GATEWAY_API_KEYS.", host)
