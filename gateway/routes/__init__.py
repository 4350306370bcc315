"""Thin HTTP handlers: resolve the model, translate, call, return."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.routes import (
    chat,
    chatglm,
    completions,
    health,
    metrics,
    models,
    responses,
    tokens,
    web,
)


def routers() -> tuple[APIRouter, ...]:
    # web first: its GET / page and ChatGLM's POST / share the path, by method.
    return (web.router, chat.router, completions.router, responses.router, tokens.router,
            chatglm.router, models.router, health.router, metrics.router)
