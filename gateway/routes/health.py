"""Probes: ``GET /health`` (the process serves) and ``GET /ready`` (it can take requests)."""

from __future__ import annotations

from fastapi import APIRouter, Request

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
    """200 once every configured model is loaded; 503 (OpenAI error body) while loading,
    after a model failed to load and while draining on shutdown."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    lifecycle.check_ready()
    return {"status": "ready"}
