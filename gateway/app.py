"""The FastAPI application: ``create_app(settings, models=None)`` builds everything.

Models either come in ready (tests pass fakes via ``models=``; the caller keeps ownership, and
the app is ready at once) or are loaded from ``settings.models`` AFTER start-up, in a worker
thread, by :class:`~gateway.loading.ModelLoader`: ``/health`` answers during the load, ``/ready``
says 503 until the last model is in, and the loader closes what it loaded when the server stops.
Model code never runs on the event loop: ``generate`` is async and backed by the model's engine
thread.

Middleware, outermost first: the request id (``X-Request-Id`` on every response and in the
access log; ``gateway/request_ids.py``), CORS (only with ``cors_origins``; it answers preflights
before any key check), the request guard (size limits, foreign ``Origin`` and ``Host`` refused;
see ``gateway/guards.py``), the request counter of ``/metrics``, API-key auth (only with keys),
then the routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from adapters.base import ChatModel
from gateway import openapi, request_ids
from gateway.auth import ApiKeyAuth, warn_if_open
from gateway.catalog import ModelCatalog
from gateway.errors import install_error_handlers
from gateway.guards import RequestGuard
from gateway.lifecycle import Lifecycle
from gateway.loading import ModelLoader
from gateway.metrics import GatewayMetrics, RequestCounter
from gateway.routes import routers
from gateway.settings import ServerSettings

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


def create_app(
    settings: ServerSettings | None = None, models: Mapping[str, ChatModel] | None = None
) -> FastAPI:
    """The app.  ``models`` (id -> model) replaces loading ``settings.models``; aliases and
    defaults of a settings entry with the same id still apply."""
    settings = settings or ServerSettings()
    aliases = {entry.id: entry.aliases for entry in settings.models}
    defaults = {entry.id: entry.defaults.given() for entry in settings.models}
    lifecycle = Lifecycle("ready" if models is not None else "loading")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warn_if_open(settings.host, settings.api_keys)
        loader: ModelLoader | None = None
        task: asyncio.Task[None] | None = None
        if models is None:
            loader = ModelLoader(app, settings, lifecycle)
            task = asyncio.create_task(loader.run())
            if not settings.models:
                logger.warning("no model configured: every model request will be a 404")
        try:
            yield
        finally:
            lifecycle.drain()
            if loader is not None and task is not None:
                loader.stop()
                await task  # a load in progress finishes first, so that it can be closed
                loader.close()

    app = FastAPI(
        title="chatglm-gateway",
        version=VERSION,
        description="OpenAI-compatible chat completions for the ChatGLM family.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.lifecycle = lifecycle
    if models is not None:
        app.state.catalog = ModelCatalog.build(models, aliases, defaults)
    else:
        app.state.catalog = ModelCatalog.build(
            {}, pending={name: e.id for e in settings.models for name in (e.id, *e.aliases)})

    def served_models() -> Iterable[tuple[str, ChatModel]]:
        catalog: ModelCatalog = app.state.catalog
        return [(model_id, served.model) for model_id, served in catalog]

    app.state.metrics = metrics = GatewayMetrics(served_models)
    install_error_handlers(app)
    for router in routers():
        app.include_router(router)
    openapi.install(app)
    # add_middleware puts each new one outside the previous: add innermost first.
    if settings.api_keys:
        app.add_middleware(ApiKeyAuth, keys=settings.api_keys)
    app.add_middleware(RequestCounter, metrics=metrics)
    app.add_middleware(RequestGuard, max_request_bytes=settings.max_request_bytes,
                       bind_host=settings.host, cors_origins=settings.cors_origins,
                       allowed_hosts=settings.allowed_hosts)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            # "*": the openai SDKs send a changing set of x-stainless-* headers from browsers.
            allow_headers=["*"],
            expose_headers=[request_ids.HEADER],
            max_age=600,
        )
    app.add_middleware(request_ids.RequestIds)
    return app
