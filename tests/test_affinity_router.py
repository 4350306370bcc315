"""The conversation-affinity router's choices, on Ray Serve's own request-router types (no
cluster): turns of a conversation rank the replica that served it first, a saturated replica
yields to the least loaded one, new conversations take turns; a routing key (``Prompt.affinity``)
keeps its prompts together whatever their tokens."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from adapters.base import Prompt, SamplingParams
from adapters.distributed import router as affinity_router
from adapters.distributed.router import AffinityRouter

DEPLOYMENT = DeploymentID(name="glm2", app_name="glm2")


@dataclass
class Replica:
    """What the router reads of a running replica."""

    replica_id: ReplicaID
    max_ongoing_requests: int = 100


def _request(ids: list[int], number: int, key: str = "") -> PendingRequest:
    prompt = Prompt(token_ids=tuple(ids), params=SamplingParams(max_tokens=8), affinity=key)
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


def _unrelated(number: int) -> list[int]:
    """A prompt that shares no prefix with any other of these tests' prompts."""
    return [50000 + 1000 * number + i for i in range(40)]


def _done(router: AffinityRouter, where: str, number: int) -> None:
    router.on_request_completed(ReplicaID(unique_id=where, deployment_id=DEPLOYMENT), str(number))


def test_a_key_keeps_its_prompts_on_one_replica_though_they_share_no_prefix() -> None:
    async def run() -> tuple[list[str], list[str]]:
        router, replicas = _router()
        keyed, unkeyed = [], []
        for number in range(0, 12, 2):
            keyed.append(await _route(router, replicas, _request(_unrelated(number), number,
                                                                 key="session-1")))
            _done(router, keyed[-1], number)
            unkeyed.append(await _route(router, replicas, _request(_unrelated(number + 1),
                                                                   number + 1)))
            _done(router, unkeyed[-1], number + 1)
        return keyed, unkeyed

    keyed, unkeyed = asyncio.run(run())
    assert len(set(keyed)) == 1, keyed
    # the same prompts without a key are new conversations each time: they take turns
    assert set(unkeyed) == {"a", "b"}, unkeyed


def test_different_keys_spread_and_each_stays_put() -> None:
    async def run() -> dict[str, list[str]]:
        router, replicas = _router()
        # the same prompt for every key: the key alone tells the conversations apart
        placed: dict[str, list[str]] = {key: [] for key in ("k1", "k2", "k3", "k4")}
        number = 0
        for turn in range(3):
            for key, where in placed.items():
                number += 1
                where.append(await _route(router, replicas, _request(
                    _conversation(1000, 3)[turn], number, key=key)))
                _done(router, where[-1], number)
        return placed

    placed = asyncio.run(run())
    assert all(len(set(where)) == 1 for where in placed.values()), placed
    assert sorted(where[0] for where in placed.values()) == ["a", "a", "b", "b"]


def test_a_key_outranks_the_token_prefix() -> None:
    async def run() -> tuple[str, str]:
        router, replicas = _router()
        chat = _conversation(1000, 2)
        first = await _route(router, replicas, _request(chat[0], 0))  # no key
        _done(router, first, 0)
        keyed = await _route(router, replicas, _request(_unrelated(1), 1, key="s"))
        _done(router, keyed, 1)  # a new key goes to the other replica (round robin)
        # chat[1] continues chat[0], which is on `first`; the key says `keyed`
        turn = await _route(router, replicas, _request(chat[1], 2, key="s"))
        return keyed, turn

    keyed, turn = asyncio.run(run())
    assert turn == keyed


def test_a_keys_saturated_replica_yields_to_the_least_loaded() -> None:
    async def run() -> tuple[str, str, str, str]:
        router, replicas = _router()
        home = await _route(router, replicas, _request(_unrelated(0), 0, key="busy"))
        again = await _route(router, replicas, _request(_unrelated(1), 1, key="busy"))
        # two running on `home` (max_running 2): the next one goes elsewhere ...
        other = await _route(router, replicas, _request(_unrelated(2), 2, key="busy"))
        _done(router, other, 2)
        # ... and the key follows it there (that replica holds its newest prompt)
        after = await _route(router, replicas, _request(_unrelated(3), 3, key="busy"))
        return home, again, other, after

    home, again, other, after = asyncio.run(run())
    assert again == home
    assert other != home
    assert after == other


def test_keys_are_bounded_and_forgotten_with_their_replica(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(affinity_router, "KEYS", 3)

    async def run() -> tuple[dict[str, str], dict[str, str]]:
        router, replicas = _router()
        for number in range(5):  # new keys take turns: k0 a, k1 b, k2 a, k3 b, k4 a
            where = await _route(router, replicas, _request(_unrelated(number), number,
                                                            key=f"k{number}"))
            _done(router, where, number)
        kept = {key: replica.unique_id for key, replica in router.keys.items()}
        # replica "a" goes away (Ray Serve replaced it): its keys go with it
        router._replicas = {r.replica_id: r for r in replicas[1:]}
        where = await _route(router, replicas[1:], _request(_unrelated(9), 9, key="k9"))
        _done(router, where, 9)
        return kept, {key: replica.unique_id for key, replica in router.keys.items()}

    kept, after = asyncio.run(run())
    assert kept == {"k2": "a", "k3": "b", "k4": "a"}  # the least recently routed forgotten
    assert after == {"k3": "b", "k9": "b"}
