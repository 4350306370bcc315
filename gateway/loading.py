"""Loading the configured models after start-up, one by one in a worker thread.

The event loop stays free while a checkpoint loads, so ``/health`` answers at once and ``/ready``
says 503 until the last model is in.  Each loaded model is swapped into a new catalog snapshot
as soon as it is ready, so a model that loaded first can already serve.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from adapters.base import ChatModel
from gateway.catalog import ServedModel
from gateway.lifecycle import Lifecycle
from gateway.settings import ModelEntry, ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)


def load_model(entry: ModelEntry, limits: Mapping[str, Any]) -> ChatModel:
    """Load one configured model through the adapters' registry (blocking: run it in a thread)."""
    # Imported here: the registry pulls in torch, which tests with injected models never need.
    from adapters.registry import load_chat_model

    model: ChatModel = load_chat_model(
        entry.id,
        entry.path,
        family=entry.family,
        dtype=entry.dtype,
        device=entry.device,
        quantize=entry.quantize,
        system_policy=entry.system_policy,
        description=entry.description,
        **limits,
    )
    info = model.info
    logger.info(
        "model '%s' ready: family=%s dtype=%s device=%s quantization=%s context=%d "
        "max_running=%d max_waiting=%d prefix_cache=%s speculative=%s; process resident "
        "memory %s",
        info.id, info.family, info.extra.get("dtype", "?"), info.extra.get("device", "?"),
        info.extra.get("quantization", "none"), info.context_length, limits["max_running"],
        limits["max_waiting"], limits["prefix_cache"], limits.get("speculative") or "off",
        resident_memory(),
    )
    return model


def resident_memory() -> str:
    """The process's resident set size, for the load log ("1.42 GiB")."""
    try:
        # Linux: the second field of /proc/self/statm is the resident size in pages.
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return _gib(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is bytes on macOS and KiB elsewhere; it is the peak, not the current size.
        return _gib(peak if sys.platform == "darwin" else peak * 1024) + " (peak)"


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GiB"


class ModelLoader:
    """Loads ``settings.models`` in order and owns what it loaded (closes it at the end)."""

    def __init__(self, app: FastAPI, settings: ServerSettings, lifecycle: Lifecycle) -> None:
        self._app = app
        self._settings = settings
        self._lifecycle = lifecycle
        self._stopping = False
        self.loaded: dict[str, ChatModel] = {}

    async def run(self) -> None:
        entries = self._settings.models
        for number, entry in enumerate(entries, start=1):
            if self._stopping:
                return
            logger.info("loading model %d/%d '%s' from %s", number, len(entries), entry.id,
                        entry.path)
            try:
                limits = self._settings.limits(entry)
                model = await anyio.to_thread.run_sync(load_model, entry, limits)
            except Exception as exc:  # the app keeps answering /health; /ready says why
                logger.exception("loading model '%s' failed", entry.id)
                self._lifecycle.fail(f"'{entry.id}': {exc}")
                return
            self.loaded[entry.id] = model
            served = ServedModel(model, entry.aliases, defaults=dict(entry.defaults.given()))
            self._app.state.catalog = self._app.state.catalog.with_model(entry.id, served)
        if not self._stopping:
            self._lifecycle.mark_ready()

    def stop(self) -> None:
        """Load nothing more (the model being loaded still finishes, then run() returns)."""
        self._stopping = True

    def close(self) -> None:
        for model_id, model in self.loaded.items():
            logger.info("closing model %s", model_id)
            try:
                model.close()
            except Exception:  # one model failing to close must not keep the others open
                logger.exception("closing model %s failed", model_id)
        self.loaded.clear()
