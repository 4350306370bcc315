"""Running the app on uvicorn with a graceful drain.

On SIGTERM/SIGINT the app's :class:`~gateway.lifecycle.Lifecycle` is put in ``draining`` at once
(``/ready`` 503, new model requests 503), uvicorn stops accepting connections and lets running
requests -- streams included -- finish for up to ``shutdown_grace`` seconds (its
``timeout_graceful_shutdown``).  Shortly before that ends, the requests still running end
themselves cleanly (a stream with an error event and ``[DONE]``, a JSON request with a 503);
then the lifespan closes the models and the process exits 0.
"""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

from gateway import request_ids
from gateway.lifecycle import Lifecycle
from gateway.settings import ServerSettings

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining when the stop signal arrives."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        lifecycle.on_failure = self._stop_after_failure

    def _stop_after_failure(self) -> None:
        logger.error("stopping: a configured model could not be loaded (%s)",
                     self.lifecycle.reason)
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logger.info("signal %d: draining for up to %s s", sig,
                        self.config.timeout_graceful_shutdown)
        self.lifecycle.drain(float(self.config.timeout_graceful_shutdown or 0))
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal once it has shut down, so the process would die
        # of SIGTERM; a drain that ran to its end is a clean exit (status 0).
        self._captured_signals.clear()


def run(app: FastAPI, settings: ServerSettings) -> int:
    """Serve until a stop signal; 1 when a model failed to load, else 0."""
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=int(round(settings.shutdown_grace)),
        # the app writes the access lines, with each request's id (gateway/request_ids.py)
        access_log=False,
    )
    # uvicorn's own handlers (set up by Config): its error lines name the request too
    request_ids.install_log_filter(logging.getLogger("uvicorn"))
    lifecycle: Lifecycle = app.state.lifecycle
    DrainingServer(config, lifecycle).run()
    return 1 if lifecycle.reason else 0
