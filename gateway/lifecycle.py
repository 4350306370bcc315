"""The server's phase: loading -> ready -> draining (or failed), read by /ready and admission.

This is the one piece of state that changes while the app serves, so it is a small mutable
object owned by the app (``app.state.lifecycle``), never a global.  Only the event loop writes
it, except :meth:`Lifecycle.drain`, which a signal handler may call (a single attribute store).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from gateway.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

Phase = Literal["loading", "ready", "draining", "failed"]


class Lifecycle:
    def __init__(self, phase: Phase = "loading") -> None:
        self.phase: Phase = phase
        self.reason = ""
        #: called when a model fails to load (the server uses it to stop: it can never be ready)
        self.on_failure: Callable[[], None] | None = None

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

    def drain(self) -> None:
        """Stop admitting new requests; running ones go on until they finish or the grace
        period ends."""
        if self.phase != "draining":
            self.phase = "draining"
            logger.info("draining: new requests are refused, running ones may finish")

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
