"""Thin HTTP handlers: resolve the model, translate, call, return."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.routes import chat, health, models


def routers() -> tuple[APIRouter, ...]:
    return (chat.router, models.router, health.router)
