"""One sequence's KV cache, and the checks every family's batched decode makes on its caches.

Both families keep keys and values the same way: one tensor ``[layers, 2, heads, capacity,
head_dim]`` per sequence whose capacity grows geometrically (doubling, capped at the context
length), so appending a token is a slice write, never a ``torch.cat`` of the whole history.
A family subclasses :class:`KVCacheBase` only for what its positions need (ChatGLM-6B's 2-D
positions).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import torch

#: The first allocation (positions); most chat prompts fit after one or two doublings.
INITIAL_CAPACITY = 64

C = TypeVar("C", bound="KVCacheBase")


class KVCacheBase:
    """Keys and values of one sequence for every layer (implements :class:`adapters.family.KVCache`)."""

    def __init__(self, layers: int, heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device):
        self._shape = (layers, 2, heads)
        self._head_dim = head_dim
        self._max_length = max_length
        self._dtype = dtype
        self._device = device
        self._kv = self._alloc(min(INITIAL_CAPACITY, max_length))
        self._length = 0

    def _alloc(self, capacity: int) -> torch.Tensor:
        with torch.inference_mode():
            return torch.zeros(*self._shape, capacity, self._head_dim, dtype=self._dtype,
                               device=self._device)

    @property
    def length(self) -> int:
        """Number of positions already in the cache."""
        return self._length

    @property
    def capacity(self) -> int:
        return self._kv.shape[3]

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more positions."""
        needed = self._length + n
        if needed > self._max_length:
            raise ValueError(
                f"sequence of {needed} positions exceeds the context length {self._max_length}"
            )
        if needed <= self.capacity:
            return
        grown = self._alloc(max(needed, min(2 * self.capacity, self._max_length)))
        grown[:, :, :, : self._length] = self._kv[:, :, :, : self._length]
        self._kv = grown

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor]:
        """Store ``[heads, n, head_dim]`` keys/values after the committed positions; return views
        of everything up to them (``[heads, length + n, head_dim]``)."""
        end = self._length + keys.shape[1]
        self._kv[layer, 0, :, self._length:end] = keys
        self._kv[layer, 1, :, self._length:end] = values
        return self._kv[layer, 0, :, :end], self._kv[layer, 1, :, :end]

    def commit(self, n: int) -> None:
        self._length += n

    def truncate(self, n: int) -> None:
        """Forget every position from ``n`` on (prefix reuse: keep the shared prefix only).
        With causal attention the first ``n`` positions do not depend on what followed them."""
        self._length = min(self._length, max(n, 0))

    def copy_prefix(self: C, n: int, room: int = 0) -> C:
        """A new cache holding a copy of the first ``n`` positions, with capacity for ``room``
        more; this one is left as it is (prefix reuse that must not cut a kept entry short).
        One strided tensor copy for every layer at once."""
        clone = copy.copy(self)  # the family's own facts (ChatGLM-6B's context, mask) come along
        clone.truncate(n)  # the family's rules of where a cache may be cut (shares _kv still)
        n = clone._length
        capacity = min(INITIAL_CAPACITY, self._max_length)
        while capacity < min(n + room, self._max_length):
            capacity = min(2 * capacity, self._max_length)
        clone._kv = self._alloc(capacity)
        with torch.inference_mode():
            clone._kv[:, :, :, :n] = self._kv[:, :, :, :n]
        return clone

    @property
    def storage(self) -> torch.Tensor:
        """``[layers, 2, heads, capacity, head_dim]``: where the keys/values live (moves on
        growth)."""
        return self._kv

    @property
    def nbytes(self) -> int:
        """Memory held by this cache (its allocated capacity, not just the used length)."""
        return self._kv.numel() * self._kv.element_size()


def own(cache: object, kind: type[C]) -> C:
    """``cache`` as the family's own cache class (a cache of another model is a TypeError)."""
    if not isinstance(cache, kind):
        raise TypeError(f"expected a {kind.__name__} from this model's new_cache(), got "
                        f"{type(cache).__name__}")
    return cache


def batch_caches(ids_per_seq: Sequence[Sequence[int]], caches: Sequence[object],
                 kind: type[C], several: bool = False) -> list[C]:
    """The checks of a batched decode step (``CausalLM.forward_batch``): one new id per
    sequence (at least one with ``several``: verifying drafted ids), one distinct, already
    prefilled cache each."""
    if not caches or len(ids_per_seq) != len(caches):
        raise ValueError("forward_batch needs one id list per cache (and at least one)")
    if several and any(len(ids) == 0 for ids in ids_per_seq):
        raise ValueError("forward_batch needs at least one new id per sequence")
    if not several and any(len(ids) != 1 for ids in ids_per_seq):
        raise ValueError("forward_batch decodes exactly one new id per sequence "
                         "(several only with every_position)")
    owned = [own(cache, kind) for cache in caches]
    if len({id(cache) for cache in owned}) != len(owned):
        raise ValueError("forward_batch got the same cache twice")
    if any(cache.length == 0 for cache in owned):
        raise ValueError("forward_batch continues sequences; prefill each with forward()")
    return owned
