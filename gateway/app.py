"""The FastAPI application: ``create_app(settings, models=None)`` builds everything.

Models either come in ready (tests pass fakes via ``models=``; the caller keeps ownership) or are
loaded by the lifespan from ``settings.models`` and closed when the server stops.  Model code
never runs on the event loop: ``generate`` is async and backed by the model's engine thread.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters.base import ChatModel
from gateway.catalog import ModelCatalog
from gateway.errors import install_error_handlers
from gateway.routes import routers
from gateway.settings import ModelEntry, ServerSettings

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


def create_app(
    settings: ServerSettings | None = None, models: Mapping[str, ChatModel] | None = None
) -> FastAPI:
    """The app.  ``models`` (id -> model) replaces loading ``settings.models``; aliases of a
    settings entry with the same id still apply."""
    settings = settings or ServerSettings()
    aliases = {entry.id: entry.aliases for entry in settings.models}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded: dict[str, ChatModel] = {}
        try:
            if models is None:
                for entry in settings.models:
                    loaded[entry.id] = load_model(entry)
                app.state.catalog = ModelCatalog.build(loaded, aliases)
            yield
        finally:
            for model_id, model in loaded.items():
                logger.info("closing model %s", model_id)
                try:
                    model.close()
                except Exception:  # one model failing to close must not keep the others open
                    logger.exception("closing model %s failed", model_id)

    app = FastAPI(
        title="chatglm-gateway",
        version=VERSION,
        description="OpenAI-compatible chat completions for the ChatGLM family.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.catalog = ModelCatalog.build(models or {}, aliases)
    install_error_handlers(app)
    for router in routers():
        app.include_router(router)
    return app


def load_model(entry: ModelEntry) -> ChatModel:
    """Load one configured model through the adapters' registry."""
    # Imported here: the registry pulls in torch, which tests with injected models never need.
    from adapters.registry import load_chat_model

    logger.info("loading model %s from %s", entry.id, entry.path)
    model: ChatModel = load_chat_model(
        entry.id,
        entry.path,
        family=entry.family,
        dtype=entry.dtype,
        device=entry.device,
        quantize=entry.quantize,
        system_policy=entry.system_policy,
        description=entry.description,
    )
    logger.info("model %s ready (%s, context %d)", entry.id, model.info.family,
                model.info.context_length)
    return model
