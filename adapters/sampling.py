"""Per-sequence next-token selection: penalties, bias, temperature, top-k/top-p, seeded sampling, logprobs.

Order (as in HF transformers' logits processors and vLLM's sampler): logit_bias -> repetition penalty ->
presence/frequency penalties -> mask of ids the tokenizer cannot decode -> greedy argmax, or temperature ->
top-k -> top-p -> sample.  Logprobs are those of the *model's* distribution (log-softmax of the raw logits,
over the full padded row), as OpenAI and vLLM report them, independent of the sampling settings.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from adapters.base import SamplingParams


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

    def __post_init__(self) -> None:
        self.generator = _new_generator(self.params.seed)

    def record(self, token_id: int) -> None:
        self.counts[token_id] += 1


def _apply_penalties(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    p = state.params
    if p.logit_bias:
        ids = torch.tensor([i for i, _ in p.logit_bias if 0 <= i < logits.numel()], dtype=torch.long)
        vals = torch.tensor(
            [b for i, b in p.logit_bias if 0 <= i < logits.numel()], dtype=logits.dtype
        )
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
    if not bool(torch.isfinite(x).any()) or bool(torch.isnan(x).any()):
        # fp16 overflow: THUDM's InvalidScoreLogitsProcessor (modeling_chatglm.py) then forces
        # id 5 rather than sampling from garbage; do the same so the request still ends sanely.
        x = torch.zeros_like(x)
        x[5] = 5e4
    x = _apply_penalties(x, state)
    if state.decodable < x.numel():
        x[state.decodable :] = float("-inf")
    if p.greedy:
        return int(torch.argmax(x))
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
    return int(torch.argmax(probs / noise))


def logprob_entries(
    logits: torch.Tensor, token_id: int, top_n: int, decodable: int
) -> tuple[float, list[tuple[int, float]]]:
    """The chosen id's logprob and the ``top_n`` most likely decodable ids with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(logp[token_id])
    if top_n <= 0:
        return chosen, []
    vals, ids = torch.topk(logp[:decodable], min(top_n, decodable))
    return chosen, [(int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
