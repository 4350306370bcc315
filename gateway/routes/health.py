"""Probes: ``GET /health`` (the process serves) and ``GET /ready`` (it can take requests)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from adapters.distributed import Replicated
from gateway.catalog import ModelCatalog
from gateway.errors import ServiceUnavailable
from gateway.lifecycle import Lifecycle

router = APIRouter()


@router.get("/health")
@router.head("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    """Always ``{"status": "ok"}`` while the process answers, even while models load."""
    return {"status": "ok"}


@router.get("/ready")
@router.head("/ready", include_in_schema=False)
async def ready(request: Request) -> dict[str, str]:
    """200 once every configured model is loaded (with ``--ray``: has at least one replica
    serving); 503 (OpenAI error body) while loading, after a model failed to load, while a
    replicated model has no live replica and while draining on shutdown."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    lifecycle.check_ready()
    catalog: ModelCatalog = request.app.state.catalog
    for model_id, served in catalog:
        if isinstance(served.model, Replicated) and not served.model.replicas():
            raise ServiceUnavailable(f"Model '{model_id}' has no replica serving.",
                                     code="no_replica")
    return {"status": "ready"}
