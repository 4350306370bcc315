"""Joining (or starting) a Ray cluster and deploying each model as a Ray Serve application.

``RayCluster(address)`` connects to the cluster at ``address`` (``ray start --head`` on one
machine, ``ray start --address`` on the others), or starts a local one when ``address`` is None;
``stop()`` stops what it started (Serve, the local Ray processes) and leaves a joined cluster
running.  ``deploy`` makes one application per model, named after the model id, with one
deployment of :class:`~adapters.distributed.replica.ModelReplica`; an application of that name
already running (``serve deploy`` of ``deploy/ray-serve.yaml``, another gateway) is used as it
is, and left running when the gateway stops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve

from adapters.distributed.app import application, capacity_of
from adapters.distributed.board import board
from adapters.distributed.remote import RemoteChatModel
from adapters.distributed.replicas import ScaleOptions

logger = logging.getLogger(__name__)


class RayCluster:
    def __init__(self, address: str | None = None) -> None:
        self.started = address is None and not ray.is_initialized()
        self.board: ray.actor.ActorHandle | None = None
        self._error: BaseException | None = None
        self._up = threading.Event()
        self._stop = threading.Event()
        # Ray starts its local processes (GCS server, raylet) bound to the life of the THREAD
        # that starts them (Linux PR_SET_PDEATHSIG, Ray's "fate sharing"): a worker thread of
        # a pool, which exits when idle, would take the cluster down with it.  So one thread
        # owns the cluster from start to stop.
        self._owner = threading.Thread(target=self._own, args=(address,), name="ray-cluster",
                                       daemon=True)
        self._owner.start()
        self._up.wait()
        if self._error is not None:
            raise self._error

    def _own(self, address: str | None) -> None:
        try:
            if not ray.is_initialized():  # else a test or a notebook owns this connection
                # No dashboard: the gateway is the cluster's front end, and it starts faster.
                ray.init(address=address, include_dashboard=False if self.started else None,
                         logging_level=logging.WARNING)
            # Handles only: the gateway serves HTTP itself; Serve's proxy would be a second door.
            serve.start(proxy_location="Disabled")
            self.board = board(create=True)
            logger.info("Ray cluster %s: %s", "started" if self.started else "joined",
                        ray.get_runtime_context().gcs_address)
        except BaseException as exc:
            self._error = exc
            return
        finally:
            self._up.set()
        self._stop.wait()
        if self.started:
            serve.shutdown()
            ray.shutdown()
            logger.info("Ray cluster stopped")

    def deploy(self, model_id: str, path: str, load: Mapping[str, Any],
               scale: ScaleOptions) -> RemoteChatModel:
        """Deploy ``model_id`` (``load``: ``load_chat_model``'s keyword arguments) and wait
        until its replicas serve (blocking: run it in a thread)."""
        capacity = capacity_of(load)
        owned = not _running(model_id)
        if not owned:
            logger.info("model '%s': using the Ray Serve application already running", model_id)
            handle = serve.get_app_handle(model_id)
        else:
            handle = serve.run(application(model_id, path, load, scale), name=model_id,
                               route_prefix=None)
        info = handle.info.remote().result()
        assert self.board is not None
        return RemoteChatModel(info, handle, self.board, capacity=capacity, owned=owned)

    def stop(self) -> None:
        """Stop Serve and the local Ray processes when this gateway started them."""
        self._stop.set()
        self._owner.join(timeout=60)


def _running(app_name: str) -> bool:
    app = serve.status().applications.get(app_name)
    return app is not None and str(app.status) in ("RUNNING", "ApplicationStatus.RUNNING")
