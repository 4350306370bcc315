"""What the gateway reads about a replicated model, without importing Ray."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as it last reported itself: ``id`` is Ray Serve's replica id (the
    ``X-Replica`` header), ``node`` the Ray node id it runs on, ``counts`` its engine's
    ``status()`` (running, waiting, KV-cache and prefix-cache counters), ``pid`` its process."""

    id: str
    node: str
    counts: Mapping[str, int] = field(default_factory=dict)
    #: the replica's process on its node (what an operator kills or profiles)
    pid: int = 0

    @property
    def running(self) -> int:
        return int(self.counts.get("running", 0))

    @property
    def waiting(self) -> int:
        return int(self.counts.get("waiting", 0))


@dataclass(frozen=True)
class ScaleOptions:
    """How one model is spread over a Ray cluster.

    ``replicas``: a fixed count; with ``max_replicas`` set, Ray Serve autoscales between
    ``min_replicas`` and ``max_replicas`` aiming at ``target_ongoing_requests`` per replica.
    ``num_cpus`` / ``num_gpus`` / ``resources`` are what each replica reserves (Ray's
    ``ray_actor_options``; custom ``resources`` pin replicas to nodes that offer them).
    ``affinity``: conversation-affinity routing (``router.py``).
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)
    #: route each conversation to the replica holding its prefix cache (else Ray Serve's
    #: default router: the less loaded of two random replicas)
    affinity: bool = True

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None


@runtime_checkable
class Replicated(Protocol):
    """A served model that runs in several replicas (the gateway lists them)."""

    def replicas(self) -> Sequence[ReplicaStatus]: ...
