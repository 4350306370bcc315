"""The conversation-affinity router's choices, on Ray Serve's own request-router types (no
cluster): turns of a conversation rank the replica that served it first, a saturated replica
yields to the least loaded one, new conversations take turns."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from adapters.base import Prompt, SamplingParams
from adapters.distributed.router import AffinityRouter

DEPLOYMENT = DeploymentID(name="glm2", app_name="glm2")


@dataclass
class Replica:
    """What the router reads of a running replica."""

    replica_id: ReplicaID
    max_ongoing_requests: int = 100


def _request(ids: list[int], number: int) -> PendingRequest:
    prompt = Prompt(token_ids=tuple(ids), params=SamplingParams(max_tokens=8))
    metadata = RequestMetadata(request_id=str(number), internal_request_id=str(number),
                               call_method="generate")
    return PendingRequest(args=[prompt], kwargs={}, metadata=metadata)


def _conversation(start: int, turns: int) -> list[list[int]]:
    """Each turn's prompt: the previous one plus 30 new ids (a history resent every turn)."""
    prompts, ids = [], [64790, 64792]  # the chat template's first ids, shared by everyone
    for turn in range(turns):
        ids = ids + [start + 100 * turn + i for i in range(30)]
        prompts.append(list(ids))
    return prompts


def _router() -> tuple[AffinityRouter, list[Replica]]:
    """A router over replicas "a" and "b" (call inside a running event loop: Ray's base class
    and its pending requests build asyncio primitives)."""
    router = AffinityRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(max_running=2)
    replicas = [Replica(ReplicaID(unique_id=name, deployment_id=DEPLOYMENT))
                for name in ("a", "b")]
    router._replicas = {r.replica_id: r for r in replicas}  # what update_replicas would store
    return router, replicas


async def _route(router: AffinityRouter, replicas: list[Replica],
                 request: PendingRequest) -> str:
    """Where the router sends ``request``: its first choice (then it is marked running)."""
    ranks = await router.choose_replicas(replicas, request)  # type: ignore[arg-type]
    chosen = ranks[0][0]
    router.on_request_routed(request, chosen.replica_id, None)
    return chosen.replica_id.unique_id


def test_turns_follow_their_conversation_and_new_ones_spread() -> None:
    async def run() -> dict[int, list[str]]:
        router, replicas = _router()
        placed: dict[int, list[str]] = {1: [], 2: [], 3: [], 4: []}
        chats = {c: _conversation(1000 * c, 5) for c in placed}
        number = 0
        for turn in range(5):
            for c, prompts in chats.items():
                number += 1
                request = _request(prompts[turn], number)
                placed[c].append(await _route(router, replicas, request))
                router.on_request_completed(
                    ReplicaID(unique_id=placed[c][-1], deployment_id=DEPLOYMENT), str(number))
        return placed

    placed = asyncio.run(run())
    assert all(len(set(where)) == 1 for where in placed.values()), placed
    assert sorted(where[0] for where in placed.values()) == ["a", "a", "b", "b"]


def test_a_saturated_replica_yields_to_the_least_loaded() -> None:
    async def run() -> tuple[str, str, str]:
        router, replicas = _router()
        chat = _conversation(1000, 2)
        home = await _route(router, replicas, _request(chat[0], 0))  # 1 of max_running 2
        again = await _route(router, replicas, _request(chat[1], 1))  # 2 running there now
        other = await _route(router, replicas, _request(chat[1] + [7, 7], 2))
        return home, again, other

    home, again, other = asyncio.run(run())
    assert again == home
    assert other != home  # the affine replica is saturated: the other one takes the turn


def test_conversations_arriving_together_spread() -> None:
    async def run() -> set[str]:
        router, replicas = _router()
        requests = [_request(_conversation(1000 * c, 1)[0], c) for c in range(2)]
        # both are ranked before either is routed (Ray Serve routes concurrently)
        ranks = [await router.choose_replicas(replicas, r) for r in requests]  # type: ignore[arg-type]
        return {rank[0][0].replica_id.unique_id for rank in ranks}

    assert asyncio.run(run()) == {"a", "b"}
