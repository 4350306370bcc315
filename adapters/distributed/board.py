"""The status board: where replicas post their counts and the gateway reads them.

Ray Serve routes a request to *some* replica; it has no call that reaches every replica of a
deployment.  So each replica posts its :class:`~adapters.distributed.replicas.ReplicaStatus`
here every :data:`REPORT_SECONDS`, and the gateway reads the board as often: ``/metrics``,
``GET /v1/models/{id}``, ``/ready`` and admission all work from that snapshot, never from a call
made while a request waits.  A replica that stops posting (killed, out of memory) drops off the
board after :data:`STALE_SECONDS`.
"""

from __future__ import annotations

import time

import ray

from adapters.distributed.replicas import ReplicaStatus

#: the board's actor name and namespace (the gateway and replicas find it by name)
BOARD_NAME = "chatglm-gateway-status"
NAMESPACE = "chatglm-gateway"
REPORT_SECONDS = 0.5
STALE_SECONDS = 3.0


# num_cpus=0: the board holds a few dicts and must never take a replica's CPU.
@ray.remote(num_cpus=0, max_restarts=-1)
class StatusBoard:
    def __init__(self) -> None:
        self._posts: dict[str, dict[str, tuple[float, ReplicaStatus]]] = {}

    def post(self, model_id: str, status: ReplicaStatus) -> None:
        self._posts.setdefault(model_id, {})[status.id] = (time.monotonic(), status)

    def gone(self, model_id: str, replica_id: str) -> None:
        """A replica that shuts down cleanly leaves the board at once."""
        self._posts.get(model_id, {}).pop(replica_id, None)

    def read(self, model_id: str) -> list[ReplicaStatus]:
        """The replicas of ``model_id`` that posted recently, by id."""
        now = time.monotonic()
        posts = self._posts.get(model_id, {})
        for replica_id in [r for r, (at, _) in posts.items() if now - at > STALE_SECONDS]:
            del posts[replica_id]
        return sorted((status for _, status in posts.values()), key=lambda s: s.id)


def board(create: bool = False) -> ray.actor.ActorHandle | None:
    """The cluster's board (``create``: start it when missing); None when there is none."""
    if create:
        # Detached: it outlives the gateway that started it, for the other gateways of a
        # shared cluster (a local cluster takes it down with everything else).
        return StatusBoard.options(  # type: ignore[attr-defined,no-any-return]
            name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True,
            lifetime="detached").remote()
    try:
        return ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
