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

    from adapters.distributed.cluster import RayCluster

logger = logging.getLogger(__name__)


def load_options(entry: ModelEntry, limits: Mapping[str, Any]) -> dict[str, Any]:
    """``load_chat_model``'s keyword arguments for ``entry`` (plain values: with Ray they are
    sent to every replica)."""
    return {"family": entry.family, "dtype": entry.dtype, "device": entry.device,
            "quantize": entry.quantize, "int8_activations": entry.int8_activations,
            "system_policy": entry.system_policy,
            "description": entry.description, **limits}


def load_model(entry: ModelEntry, limits: Mapping[str, Any], cluster: RayCluster | None = None,
               scale: Mapping[str, Any] | None = None) -> ChatModel:
    """Load one configured model through the adapters' registry, or deploy it on ``cluster``
    as Ray Serve replicas spread as ``scale`` says (blocking: run it in a thread)."""
    model: ChatModel
    if cluster is not None:
        from adapters.distributed import ScaleOptions

        options = ScaleOptions(**(scale or {}))
        model = cluster.deploy(entry.id, str(entry.path), load_options(entry, limits), options)
        logger.info("model '%s' ready on Ray Serve: %s", entry.id, options)
        return model
    # Imported here: the registry pulls in torch, which tests with injected models never need.
    from adapters.registry import load_chat_model

    model = load_chat_model(entry.id, entry.path, **load_options(entry, limits))
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
        #: with ``settings.ray``: the Ray cluster the models run on (stopped last)
        self.cluster: RayCluster | None = None

    async def run(self) -> None:
        entries = self._settings.models
        if self._settings.ray:
            try:
                self.cluster = await anyio.to_thread.run_sync(connect, self._settings)
            except Exception as exc:
                logger.exception("connecting to the Ray cluster failed")
                self._lifecycle.fail(f"Ray cluster: {exc}")
                return
        for number, entry in enumerate(entries, start=1):
            if self._stopping:
                return
            logger.info("loading model %d/%d '%s' from %s", number, len(entries), entry.id,
                        entry.path)
            try:
                limits = self._settings.limits(entry)
                model = await anyio.to_thread.run_sync(
                    load_model, entry, limits, self.cluster, self._settings.scale(entry))
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
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


def connect(settings: ServerSettings) -> RayCluster:
    """Join ``settings.ray_address``'s Ray cluster, or start a local one (blocking)."""
    # Ray's C++ crash handler would take over SIGTERM in this process and abort() 3 s after
    # it (absl's failure-signal alarm), killing the drain mid-way; the gateway handles SIGTERM
    # itself.  Ray reads this when it is first imported.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    # Imported here: Ray is an optional extra, imported only when --ray asks for it.
    try:
        from adapters.distributed.cluster import RayCluster
    except ImportError as exc:
        raise RuntimeError("--ray needs Ray Serve: pip install 'chatglm-gateway[ray]'") from exc
    return RayCluster(settings.ray_address)
