"""Conversation affinity: send each turn of a chat to the replica that holds its prefix cache.

A chat client resends the whole conversation every turn, so turn ``n + 1``'s prompt starts with
turn ``n``'s.  The replica that served turn ``n`` keeps its KV cache (``runtime/prefix_cache.py``)
and prefills only what is new; any other replica prefills the whole history again.  Ray Serve's
default router balances by queue length alone, so a 10-turn chat would land on either replica at
random.  This router (Ray Serve's request-router API) remembers the prompts each replica was
sent and sends a prompt that continues one of them (whose leading token ids are that earlier
prompt) to the same replica, as long as that replica is not saturated (``max_running`` requests
in flight): then, and for a conversation no replica knows, the least-loaded replica takes it
(among equally loaded ones, the one given a new conversation longest ago, so that conversations
spread).

A prompt may also carry the client's own name for its conversation (``Prompt.affinity``: the
gateway's ``X-Session-Id`` header, ``prompt_cache_key`` or ``user``, see ``gateway/affinity.py``).
Then the name decides, not the token ids: every prompt with that key goes to the replica that
served the key last (unless saturated, as above), even when the prompts share no prefix (a
client that trims or rewrites its history, or several conversations of one user).  A key no
replica has served yet (or whose replica is gone) is a new conversation, whatever its tokens:
different keys may well start with the same text.

Other calls (``prepare``, ``info``) go to the least-loaded replica.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from adapters.base import Prompt
from adapters.runtime.prefix_cache import common_prefix

logger = logging.getLogger(__name__)

#: A shared prefix shorter than this is no reason for affinity (the prefix cache does not even
#: reuse fewer than 8 tokens).
MIN_AFFINITY_TOKENS = 16
#: A continued conversation holds the whole earlier prompt, but for the last few ids: the end
#: of a turn ("答：") may tokenize differently once the answer follows it.
SLACK = 4
#: prompts remembered per replica (a conversation counts once: a turn replaces the one before)
HISTORY = 256
#: routing keys remembered (the least recently routed is forgotten first)
KEYS = 4096


class AffinityRouter(RequestRouter):
    def initialize_state(self, max_running: int = 8, **kwargs: Any) -> None:
        #: a replica with this many requests in flight is saturated: affinity yields to load
        self.max_running = max_running
        self.history: dict[ReplicaID, collections.deque[tuple[int, ...]]] = {}
        #: the replica that served each routing key last (least recently routed first)
        self.keys: collections.OrderedDict[str, ReplicaID] = collections.OrderedDict()
        #: when (a count of placements) each replica was last given a new conversation, and
        #: the requests being placed as new ones
        self.placements = 0
        self.placed: dict[ReplicaID, int] = {}
        self.placing: set[str] = set()
        #: the ``generate`` calls running on each replica (by Ray Serve's request id)
        self.generating: dict[ReplicaID, set[str]] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        prompt = _prompt(pending_request)
        if pending_request is None or prompt is None or not candidate_replicas:
            return [candidate_replicas]  # Ray Serve takes the least loaded of them
        # A key names the conversation: an unknown key is a new one, even if its tokens
        # continue another (several users' first turns may well be the same text).
        affine = (self._keyed(prompt.affinity, candidate_replicas) if prompt.affinity
                  else self._affine(prompt.token_ids, candidate_replicas))
        if affine is not None and self._queue(affine) < self.max_running:
            return [[affine], sorted((r for r in candidate_replicas if r is not affine),
                                     key=self._queue)]
        # A new conversation (or a saturated replica): least loaded first; among equally
        # loaded ones, the one given a new conversation longest ago (round robin), so that
        # conversations spread even while every replica is idle.  One replica per rank: Ray
        # Serve tries them in this order.
        self.placing.add(pending_request.metadata.internal_request_id)
        ranked = sorted(candidate_replicas, key=lambda r: (
            self._queue(r), self.placed.get(r.replica_id, -1)))
        # Counted now, not once routed: requests arriving together must not all see the same
        # replica as "given a conversation longest ago".
        self.placements += 1
        self.placed[ranked[0].replica_id] = self.placements
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        prompt = _prompt(pending_request)
        if prompt is None:
            return
        request_id = pending_request.metadata.internal_request_id
        self.generating.setdefault(replica_id, set()).add(request_id)
        if request_id in self.placing:  # placed as a new conversation (maybe not where ranked)
            self.placing.discard(request_id)
            self.placements += 1
            self.placed[replica_id] = self.placements
        ids = prompt.token_ids
        held = self.history.setdefault(replica_id, collections.deque(maxlen=HISTORY))
        # This turn continues an earlier one: it replaces it (one entry per conversation).
        for earlier in [h for h in held if len(h) <= len(ids) and ids[: len(h)] == h]:
            held.remove(earlier)
        held.append(ids)
        if prompt.affinity:
            self.keys[prompt.affinity] = replica_id
            self.keys.move_to_end(prompt.affinity)
            if len(self.keys) > KEYS:
                self.keys.popitem(last=False)
        gone = self.history.keys() - self.curr_replicas.keys()
        for replica in gone:
            del self.history[replica]
            self.placed.pop(replica, None)
            self.generating.pop(replica, None)
        if gone:  # every key's replica has a history, so keys only point at a gone one now
            self.keys = collections.OrderedDict(
                (key, replica) for key, replica in self.keys.items() if replica not in gone)

    def _keyed(self, key: str, candidates: list[RunningReplica]) -> RunningReplica | None:
        """The replica that served routing key ``key`` last, if it is a candidate."""
        home = self.keys.get(key)
        return next((r for r in candidates if r.replica_id == home), None)

    def _affine(self, ids: tuple[int, ...],
                candidates: list[RunningReplica]) -> RunningReplica | None:
        """The replica that served the turn this prompt continues: one of its remembered
        prompts is (nearly) a prefix of ``ids``.  Another conversation shares only the chat
        template's first tokens (or a system prompt) with it, which is no reason to pile
        conversations onto one replica."""
        best, best_len = None, 0
        for replica in candidates:
            for held in self.history.get(replica.replica_id, ()):
                n = common_prefix(held, ids)
                if n > best_len and n >= max(MIN_AFFINITY_TOKENS, len(held) - SLACK):
                    best, best_len = replica, n
        return best

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.generating.get(replica_id, set()).discard(internal_request_id)

    def _queue(self, replica: RunningReplica) -> int:
        """Generations this router has running on ``replica`` (its own count: Ray Serve's
        queue-length cache also counts short calls and may lag behind)."""
        return len(self.generating.get(replica.replica_id, ()))


def _prompt(pending_request: PendingRequest | None) -> Prompt | None:
    """The Prompt of a ``generate`` call (None for other calls)."""
    if pending_request is None or pending_request.metadata.call_method != "generate":
        return None
    args = pending_request.args
    return args[0] if args and isinstance(args[0], Prompt) else None
