"""Reuse of KV caches across requests that share a prompt prefix.

Chat clients resend the whole conversation every turn, so turn ``n + 1``'s prompt starts with turn
``n``'s prompt and answer.  When a request finishes, its cache is kept here keyed by the ids it holds;
a new request takes the entry with the longest common prefix, truncates it to that prefix and
prefills only the rest, so time to first token stops growing with the history.  An entry is owned
by one request at a time (taken out, put back when that request finishes).  Entries are evicted
least recently used, and whenever running requests need the memory.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from adapters.family import KVCache

#: A shorter shared prefix is not worth the bookkeeping (it is the chat template's first tokens).
MIN_REUSE = 8


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # compare in blocks first: most of a long shared history is equal
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[int, tuple[tuple[int, ...], KVCache]] = (
            collections.OrderedDict()
        )
        self._next = 0
        self.hits = 0
        #: prompt tokens looked up, and those whose KV was reused (the hit rate, in tokens)
        self.queried_tokens = 0
        self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        # list() first: another thread (a metrics scrape) may read this while the engine's
        # thread changes the entries; copying the values is one step under the GIL
        return sum(cache.nbytes for _, cache in list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, ids: Sequence[int]) -> tuple[KVCache, int] | None:
        """Remove and return the cache sharing the longest prefix with ``ids`` (truncated to it),
        keeping at least one id of ``ids`` to be fed so the caller gets fresh logits."""
        self.queried_tokens += len(ids)
        best_key, best_len = None, 0
        for key, (held, _) in self._entries.items():
            n = min(common_prefix(held, ids), len(ids) - 1)
            if n > best_len:
                best_key, best_len = key, n
        if best_key is None or best_len < MIN_REUSE:
            return None
        _, cache = self._entries.pop(best_key)
        cache.truncate(best_len)
        self.hits += 1
        self.reused_tokens += best_len
        return cache, best_len

    def put(self, ids: Sequence[int], cache: KVCache) -> None:
        if self.max_bytes <= 0 or cache.length != len(ids) or len(ids) < MIN_REUSE:
            return
        self._entries[self._next] = (tuple(ids), cache)
        self._next += 1
        self.shrink_to(self.max_bytes)

    def shrink_to(self, limit: int) -> None:
        """Drop least recently stored entries until at most ``limit`` bytes are held."""
        held = self.nbytes
        while self._entries and held > max(limit, 0):
            _, (_, cache) = self._entries.popitem(last=False)
            held -= cache.nbytes

    def clear(self) -> None:
        self._entries.clear()
