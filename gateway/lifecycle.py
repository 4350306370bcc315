"""The server's phase: loading -> ready -> draining (or failed), read by /ready and admission.

This is the one piece of state that changes while the app serves, so it is a small mutable
object owned by the app (``app.state.lifecycle``), never a global.  Only the event loop writes
it, except :meth:`Lifecycle.drain`, which a signal handler may call (a single attribute store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from gateway.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

Phase = Literal["loading", "ready", "draining", "failed"]

#: Requests still running this long before the server's own grace period ends are ended by the
#: gateway (an error event and [DONE], or a 503 body) rather than cut mid-response by uvicorn.
CUT_MARGIN = 1.0


class Lifecycle:
    def __init__(self, phase: Phase = "loading") -> None:
        self.phase: Phase = phase
        self.reason = ""
        #: called when a model fails to load (the server uses it to stop: it can never be ready)
        self.on_failure: Callable[[], None] | None = None
        #: while draining: when (``time.monotonic()``) running requests must end
        self.cut_at: float | None = None

    def mark_ready(self) -> None:
        if self.phase == "loading":
            self.phase = "ready"
            logger.info("ready: every configured model is loaded")

    def fail(self, reason: str) -> None:
        if self.phase != "draining":
            self.phase = "failed"
        self.reason = reason
        if self.on_failure is not None:
            self.on_failure()

    def drain(self, grace: float = 0.0) -> None:
        """Stop admitting new requests; running ones go on until they finish or until shortly
        before ``grace`` seconds pass (:meth:`must_cut`).  A single attribute store each, so a
        signal handler may call it."""
        if self.cut_at is None:
            margin = min(CUT_MARGIN, grace / 2)
            self.cut_at = time.monotonic() + max(grace - margin, 0.0)
        if self.phase != "draining":
            self.phase = "draining"
            logger.info("draining: new requests are refused, running ones may finish")

    def must_cut(self) -> bool:
        """Whether running requests must end now (the drain's grace is nearly over)."""
        return self.cut_at is not None and time.monotonic() >= self.cut_at

    @property
    def draining(self) -> bool:
        return self.phase == "draining"

    def check_ready(self) -> None:
        """Raise the 503 that /ready answers unless every model is loaded and not draining."""
        if self.phase == "ready":
            return
        messages = {
            "loading": ("The server is loading its models.", "models_loading"),
            "draining": ("The server is shutting down.", "server_draining"),
            "failed": (f"A model failed to load: {self.reason}", "model_load_failed"),
        }
        message, code = messages[self.phase]
        raise ServiceUnavailable(message, code=code)

    def check_admission(self) -> None:
        """Raise a 503 for a new model request while draining."""
        if self.draining:
            raise ServiceUnavailable(
                "The server is shutting down and accepts no new requests. Please retry on "
                "another instance or shortly.", code="server_draining",
            )
