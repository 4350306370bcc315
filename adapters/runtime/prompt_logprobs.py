"""Logprobs of a prompt's own tokens (legacy completions' ``echo`` with ``logprobs``).

The prefill computes the logits of every position of the scored span, chunk by chunk; the row
of position ``i`` predicts the id at ``i + 1``.  Only the small per-token entries are kept, never
the rows, so a long prompt holds one chunk of rows at a time.

ChatGLM-6B reads its context (everything before ``<sop>``) bidirectionally: the row of a context
position has seen the ids after it.  Its entries are what THUDM's model computes at those
positions (``ChatGLMForConditionalGeneration.forward`` applies ``lm_head`` to every position),
not a left-to-right likelihood; README.md says so where it documents ``echo``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from adapters.base import MIN_LOGPROB, PromptLogprobs, TokenLogprob, TopLogprob

#: token id -> (OpenAI's token string, its bytes): the engine's ``token_repr``
TokenRepr = Callable[[int], tuple[str, tuple[int, ...]]]


class PromptScorer:
    """Collects the entries of ``ids[start:end]`` (the first has none: nothing scored comes
    before it) from the rows the prefill hands over in order."""

    def __init__(self, ids: Sequence[int], span: tuple[int, int], top_n: int, decodable: int,
                 token_repr: TokenRepr):
        self._ids = ids
        self.start, self.end = span
        self._top_n = min(top_n, decodable)
        self._decodable = decodable
        self._repr = token_repr
        self._entries: list[TokenLogprob] = []

    def wants(self, first: int, count: int) -> bool:
        """Whether any of the rows of positions ``first .. first + count - 1`` is scored."""
        return first < self.end - 1 and first + count > self.start

    def add(self, first: int, rows: torch.Tensor) -> None:
        """Take the scored rows among ``rows`` (float32 ``[count, vocab]``, positions from
        ``first``); chunks come in prompt order."""
        lo, hi = max(first, self.start), min(first + len(rows), self.end - 1)
        if hi <= lo:
            return
        # on the rows' device; only the picked numbers come back
        logp = torch.log_softmax(rows[lo - first : hi - first].float(), dim=-1)
        following = self._ids[lo + 1 : hi + 1]
        index = torch.tensor(following, dtype=torch.long, device=logp.device)
        chosen = logp.gather(1, index[:, None])[:, 0].tolist()
        if self._top_n > 0:
            values, ids = torch.topk(logp[:, : self._decodable], self._top_n, dim=-1)
            tops = list(zip(ids.tolist(), values.tolist(), strict=True))
        else:
            tops = [([], [])] * (hi - lo)
        for token, lp, (alt_ids, alt_lps) in zip(following, chosen, tops, strict=True):
            alternatives = []
            for alt, alt_lp in zip(alt_ids, alt_lps, strict=True):
                alt_text, alt_raw = self._repr(alt)
                alternatives.append(TopLogprob(alt_text, _reported(alt_lp), alt_raw))
            text, raw = self._repr(token)
            self._entries.append(TokenLogprob(text, _reported(lp), raw, tuple(alternatives)))

    def result(self) -> PromptLogprobs | None:
        """The scored prompt (None for an empty span); every row must have been added."""
        if self.end <= self.start:
            return None
        if len(self._entries) != self.end - self.start - 1:
            raise RuntimeError(f"prompt scoring saw {len(self._entries)} of "
                               f"{self.end - self.start - 1} rows")
        text, raw = self._repr(self._ids[self.start])
        return PromptLogprobs(first=text, first_bytes=raw, following=tuple(self._entries))


def _reported(logprob: float) -> float:
    """As OpenAI reports it: finite, at least :data:`~adapters.base.MIN_LOGPROB`."""
    return logprob if math.isfinite(logprob) and logprob >= MIN_LOGPROB else MIN_LOGPROB
