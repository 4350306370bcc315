"""Per-sequence next-token selection: penalties, bias, temperature, top-k/top-p, seeded sampling, logprobs.

Order (as in HF transformers' logits processors and vLLM's sampler): logit_bias -> repetition penalty ->
presence/frequency penalties -> mask of ids the tokenizer cannot decode -> greedy argmax, or temperature ->
top-k -> top-p -> sample.  Logprobs are those of the *model's* distribution (log-softmax of the raw logits,
over the full padded row), as OpenAI and vLLM report them, independent of the sampling settings.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from adapters.base import MIN_LOGPROB, SamplingParams


def _new_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return gen


@dataclass
class SamplerState:
    """What a sequence's sampler remembers between steps."""

    params: SamplingParams
    decodable: int  # ids >= decodable are never chosen
    prompt_ids: tuple[int, ...] = ()
    counts: Counter[int] = field(default_factory=Counter)  # generated ids -> times
    generator: torch.Generator = field(init=False)
    # logit_bias as (ids, values) tensors, built on the first step (not once per step)
    _bias: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.generator = _new_generator(self.params.seed)

    def bias_tensors(self, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bias is None:
            pairs = [(i, b) for i, b in self.params.logit_bias if 0 <= i < vocab]
            self._bias = (torch.tensor([i for i, _ in pairs], dtype=torch.long),
                          torch.tensor([b for _, b in pairs], dtype=dtype))
        return self._bias

    def record(self, token_id: int) -> None:
        self.counts[token_id] += 1


#: Row width of :func:`argmax`'s two-stage reduction.
_ARGMAX_BLOCK = 256


def argmax(x: torch.Tensor) -> int:
    """``int(torch.argmax(x))`` (first index of the maximum) of a NaN-free 1-D tensor.

    Why: torch 2.13's CPU argmax over a 65024-long vocabulary row is a scalar loop, paid per
    sequence per decode step; a row-wise ``amax`` over blocks of 256, then an argmax inside the
    winning block, is vectorised (several times faster; figures in bench/README.md) and picks the
    same index: the first block holding the maximum, and its first position there.
    """
    n = x.numel()
    rows = n // _ARGMAX_BLOCK
    if rows < 16:
        return int(torch.argmax(x))
    head = x[: rows * _ARGMAX_BLOCK].view(rows, _ARGMAX_BLOCK)
    r = int(torch.argmax(head.amax(dim=1)))
    best = r * _ARGMAX_BLOCK + int(torch.argmax(head[r]))
    tail = x[rows * _ARGMAX_BLOCK:]
    if tail.numel():
        t = int(torch.argmax(tail))
        if tail[t] > x[best]:  # strictly: on a tie the earlier (head) index wins, as torch's
            return rows * _ARGMAX_BLOCK + t
    return best


def _no_valid_scores(x: torch.Tensor) -> bool:
    """Whether ``x`` has a NaN or no finite value (THUDM's InvalidScoreLogitsProcessor case).
    One sum decides the common case: finite only if every value is finite (bar overflow)."""
    if math.isfinite(float(x.sum())):
        return False
    return not bool(torch.isfinite(x).any()) or bool(torch.isnan(x).any())


def _apply_penalties(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    p = state.params
    if p.logit_bias:
        ids, vals = state.bias_tensors(logits.numel(), logits.dtype)
        logits.index_add_(0, ids, vals)
    if p.repetition_penalty != 1.0:
        # HF RepetitionPenaltyLogitsProcessor (CTRL paper): over prompt and generated ids.
        seen = set(state.prompt_ids) | set(state.counts)
        if seen:
            ids = torch.tensor(sorted(seen), dtype=torch.long)
            ids = ids[ids < logits.numel()]
            vals = logits[ids]
            logits[ids] = torch.where(
                vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty
            )
    if (p.presence_penalty or p.frequency_penalty) and state.counts:
        # OpenAI's definition: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence,
        # with c[j] the number of times j was sampled so far in this completion.
        ids = torch.tensor(list(state.counts.keys()), dtype=torch.long)
        cnt = torch.tensor(list(state.counts.values()), dtype=logits.dtype)
        logits[ids] -= cnt * p.frequency_penalty + p.presence_penalty
    return logits


def choose(logits: torch.Tensor, state: SamplerState) -> int:
    """Pick the next id from float32 CPU ``logits`` (1-D, padded vocab)."""
    p = state.params
    x = logits.clone()
    if _no_valid_scores(x):
        # fp16 overflow: THUDM's InvalidScoreLogitsProcessor (modeling_chatglm.py) then forces
        # id 5 rather than sampling from garbage; do the same so the request still ends sanely.
        x = torch.zeros_like(x)
        x[5] = 5e4
    x = _apply_penalties(x, state)
    if state.decodable < x.numel():
        x[state.decodable :] = float("-inf")
    if p.greedy:
        return argmax(x)
    x = x / p.temperature
    if p.top_k and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest set whose mass reaches top_p (the first token is always kept)
        drop = (cum - sorted_probs) >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    # Exponential-race sampling (argmax of p / Exp(1)) is an exact categorical draw that needs one
    # generator call per step, so a seeded request gives the same ids alone or inside a batch.
    noise = torch.empty_like(probs).exponential_(1.0, generator=state.generator)
    return argmax(probs / noise)


def logprob_entries(
    logits: torch.Tensor, token_id: int, top_n: int, decodable: int
) -> tuple[float, list[tuple[int, float]]]:
    """The chosen id's logprob and the ``top_n`` most likely decodable ids with theirs, each at
    least :data:`~adapters.base.MIN_LOGPROB` (as OpenAI reports masked tokens)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = _reported(float(logp[token_id]))
    if top_n <= 0:
        return chosen, []
    vals, ids = torch.topk(logp[:decodable], min(top_n, decodable))
    return chosen, [(int(i), _reported(float(v)))
                    for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]


def _reported(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob >= MIN_LOGPROB else MIN_LOGPROB
