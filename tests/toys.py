"""Small deterministic stand-ins for engine tests: a byte tokenizer and a scripted causal LM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes; 256 is eos.  Decoding an incomplete sequence gives U+FFFD,
    like SentencePiece's byte fallback."""

    vocab_size = 257
    eos = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""


@dataclass
class ToyCache:
    ids: list[int]
    prompt_len: int = -1

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return 100 * len(self.ids)

    def truncate(self, n: int) -> None:
        del self.ids[n:]

    def copy_prefix(self, n: int, room: int = 0) -> ToyCache:
        return ToyCache(self.ids[:n], self.prompt_len)


class ScriptedLM:
    """Logits that make greedy decoding follow ``script`` (then eos); the padded vocab is wider
    than the tokenizer's, and the widest logit sits on an undecodable id to prove masking."""

    def __init__(self, script: bytes, padded_vocab_size: int = 264, context_length: int = 512):
        self.script = list(script)
        self.padded_vocab_size = padded_vocab_size
        self.context_length = context_length
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.calls = 0

    kv_bytes_per_token = 100

    def new_cache(self) -> ToyCache:
        return ToyCache([])

    def _row(self, n_generated: int) -> torch.Tensor:
        row = torch.zeros(self.padded_vocab_size)
        row[self.padded_vocab_size - 1] = 50.0  # undecodable: must never be chosen
        target = self.script[n_generated] if n_generated < len(self.script) else ByteTokenizer.eos
        row[target] = 10.0
        return row

    def forward(self, ids: Sequence[int], cache: ToyCache) -> torch.Tensor:
        self.calls += 1
        if cache.prompt_len < 0:
            cache.prompt_len = len(ids)
        cache.ids.extend(ids)
        return self._row(cache.length - cache.prompt_len)

    def forward_batch(self, ids_per_seq, caches) -> torch.Tensor:
        return torch.stack([self.forward(i, c) for i, c in zip(ids_per_seq, caches, strict=True)])


class HashLM(ScriptedLM):
    """Next byte = a hash of every id in the cache: any mistake in reusing or truncating a
    cache changes the output, so reuse can be checked against generation from scratch."""

    def __init__(self) -> None:
        super().__init__(b"")
        self.fed = 0  # ids fed in total (what prefix reuse saves)

    def forward(self, ids: Sequence[int], cache: ToyCache) -> torch.Tensor:
        self.calls += 1
        self.fed += len(ids)
        cache.ids.extend(ids)
        row = torch.zeros(self.padded_vocab_size)
        row[97 + hash(tuple(cache.ids)) % 26] = 10.0
        return row


class CopyLM(ScriptedLM):
    """An induction head: the id that followed the most recent earlier occurrence of the last
    id gets a large logit, over a spread that hashes the last three ids.  Greedy text copies
    the prompt (then loops), sampled text mostly copies and sometimes does not: drafts copied
    from the context are often but not always right.  ``forward_batch`` takes several ids per
    sequence with ``every_position`` (draft verification)."""

    def __init__(self, copy_weight: float = 7.0, spread: float = 0.5) -> None:
        super().__init__(b"")
        self.copy_weight = copy_weight
        self.spread = spread
        self.rows_fed = 0  # positions computed in all

    def _logits(self, ids: Sequence[int]) -> torch.Tensor:
        row = torch.zeros(self.padded_vocab_size)
        gen = torch.Generator().manual_seed(hash(tuple(ids[-3:])) % 2**31)
        row[:256] = torch.randn(256, generator=gen) * self.spread
        for j in range(len(ids) - 2, -1, -1):
            if ids[j] == ids[-1]:
                row[ids[j + 1]] += self.copy_weight
                break
        return row

    def forward(self, ids: Sequence[int], cache: ToyCache,  # type: ignore[override]
                every_position: bool = False) -> torch.Tensor:
        self.calls += 1
        rows = []
        for token in ids:
            cache.ids.append(token)
            rows.append(self._logits(cache.ids))
        self.rows_fed += len(rows)
        return torch.stack(rows) if every_position else rows[-1]

    def forward_batch(self, ids_per_seq, caches, every_position: bool = False) -> torch.Tensor:
        rows = [self.forward(i, c, every_position=True)
                for i, c in zip(ids_per_seq, caches, strict=True)]
        return torch.cat(rows) if every_position else torch.stack([r[-1] for r in rows])
