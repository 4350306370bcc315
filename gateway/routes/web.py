"""The browser chat page: ``GET /`` and its assets under ``GET /static/{file}``.

The page is plain HTML/CSS/JS shipped inside the package (``gateway/static``, declared as
package data) and talks to the ordinary OpenAI endpoints like any other client, so it needs no
server-side state.  Nothing is loaded from outside the gateway: no CDN, no web fonts.

``POST /`` (ChatGLM's own API, ``routes/chatglm.py``) lives in another router; only ``GET`` is claimed here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from gateway.errors import RouteNotFound

#: The folder shipped as package data (setuptools installs package data as real files).
STATIC_DIR = Path(str(resources.files("gateway") / "static"))
INDEX = "index.html"

#: Content types by extension, explicit so they do not depend on the host's mime.types
#: (a missing ``.js`` entry would make browsers refuse the script under nosniff).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

#: The page is tiny; revalidating on every load means an upgraded gateway never runs a stale
#: app.js against a changed API.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter()


@router.get("/", include_in_schema=False)
@router.head("/", include_in_schema=False)
async def index() -> FileResponse:
    return asset(INDEX)


# A route rather than a StaticFiles mount: FastAPI before 0.112 drops Mounts of an included
# APIRouter silently, and the flat folder needs nothing StaticFiles adds.
@router.get("/static/{name}", include_in_schema=False)
@router.head("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    return asset(name)


def asset(name: str) -> FileResponse:
    """One file of the static folder by bare name; anything else (``..``, sub-paths, unknown
    types) is a 404."""
    path = STATIC_DIR / name
    content_type = CONTENT_TYPES.get(path.suffix)
    if content_type is None or "/" in name or "\\" in name or name.startswith(".") \
            or not path.is_file():
        raise RouteNotFound(f"No static file named '{name}'.", code="unknown_url")
    return FileResponse(path, media_type=content_type, headers=HEADERS)
