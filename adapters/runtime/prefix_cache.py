"""Reuse of KV caches across requests that share a prompt prefix.

Chat clients resend the whole conversation every turn, so turn ``n + 1``'s prompt starts with turn
``n``'s prompt and answer.  When a request finishes, its cache is kept here keyed by the ids it holds;
a new request looks for the entry with the longest common prefix and prefills only the rest, so time
to first token stops growing with the history.

A request that continues an entry (a later turn of its conversation) takes it out, cut to the
shared prefix: the entry is superseded by the longer one the request puts back when it finishes.
A request that shares only part of an entry (a new conversation sharing the chat template's first
tokens, another chat with the same system prompt, another branch of the same history: a
regenerated answer, an edited message) gets a copy of the shared positions in a new cache, and
the entry stays for its own conversation: on one replica, interleaved chats (what a
conversation-affinity router sends it) would otherwise cut each other's histories down to the
template at every turn.  An entry is owned by one request at a time (taken out, put back when that
request finishes); a copy is a new allocation, counted with the running requests' caches.
Entries are evicted least recently stored first, and whenever running requests need the memory.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

from adapters.family import KVCache

#: A shorter shared prefix is not worth the bookkeeping (it is the chat template's first tokens).
MIN_REUSE = 8

#: Ids at the join of a prompt and its answer that the next turn may encode differently (the
#: template re-encodes the answer's text, and a tokenizer may merge the prompt's last piece with
#: the answer's first): a request still continues an entry when it parts from it that many ids
#: before the end of the entry's prompt.  (The answer's own ids often differ further on: a
#: generated id sequence need not be how the tokenizer would write its text.)
JOIN_SLACK = 2


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


@dataclass
class Entry:
    ids: tuple[int, ...]
    #: how many of ``ids`` were its request's prompt (the rest: its answer)
    prompt_len: int
    cache: KVCache

    def continued_by(self, ids: Sequence[int], shared: int) -> bool:
        """Whether ``ids`` (sharing ``shared`` ids with this entry) is a later turn of its
        conversation: it shares the entry's prompt and goes on past the entry's end.  A request
        that stops within the entry (a regenerated answer, a repeated request) or parts from it
        earlier (another conversation, an edited message) is not."""
        return shared >= self.prompt_len - JOIN_SLACK and len(ids) > len(self.ids)


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._next = 0
        self.hits = 0
        #: hits served by copying part of an entry that stays (see the module docstring)
        self.copies = 0
        #: prompt tokens looked up, and those whose KV was reused (the hit rate, in tokens)
        self.queried_tokens = 0
        self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        # list() first: another thread (a metrics scrape) may read this while the engine's
        # thread changes the entries; copying the values is one step under the GIL
        return sum(entry.cache.nbytes for entry in list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, ids: Sequence[int]) -> tuple[KVCache, int] | None:
        """A cache holding the longest prefix ``ids`` shares with an entry, and its length,
        keeping at least one id of ``ids`` to be fed so the caller gets fresh logits: the entry
        itself (removed, cut to that prefix) when ``ids`` continues it, else a copy of the shared
        positions (the entry stays for its own conversation)."""
        self.queried_tokens += len(ids)
        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            n = min(common_prefix(entry.ids, ids), len(ids) - 1)
            if n > best_len:
                best_key, best_len = key, n
        if best_key is None or best_len < MIN_REUSE:
            return None
        entry = self._entries[best_key]
        if entry.continued_by(ids, best_len):
            del self._entries[best_key]
            cache = entry.cache
            cache.truncate(best_len)
        else:
            # Left where it is in the eviction order: a template-sized match must not keep an
            # old entry alive, and a branch nobody continues ages out as usual.
            cache = entry.cache.copy_prefix(best_len, room=len(ids) - best_len)
            self.copies += 1
        self.hits += 1
        self.reused_tokens += best_len
        return cache, best_len

    def put(self, ids: Sequence[int], cache: KVCache, prompt_len: int | None = None) -> None:
        """Keep ``cache`` (holding exactly ``ids``, of which the first ``prompt_len`` were its
        request's prompt; default all) for later requests."""
        if self.max_bytes <= 0 or cache.length != len(ids) or len(ids) < MIN_REUSE:
            return
        held = tuple(ids)
        # An entry the new one contains is of no further use (a repeated request, or a copy's
        # source that the copy caught up with).
        for key in [k for k, e in self._entries.items()
                    if common_prefix(e.ids, held) == len(e.ids)]:
            del self._entries[key]
        self._entries[self._next] = Entry(held, len(held) if prompt_len is None else prompt_len,
                                          cache)
        self._next += 1
        self.shrink_to(self.max_bytes)

    def shrink_to(self, limit: int) -> None:
        """Drop least recently stored entries until at most ``limit`` bytes are held."""
        held = self.nbytes
        while self._entries and held > max(limit, 0):
            _, entry = self._entries.popitem(last=False)
            held -= entry.cache.nbytes

    def clear(self) -> None:
        self._entries.clear()
