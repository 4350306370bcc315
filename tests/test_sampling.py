from __future__ import annotations

import math

import torch

from adapters.base import SamplingParams
from adapters.sampling import SamplerState, choose, logprob_entries


def _state(**kw) -> SamplerState:
    return SamplerState(SamplingParams(**kw), decodable=8)


def test_greedy_picks_argmax_among_decodable_ids() -> None:
    logits = torch.tensor([0.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 99.0, 99.0])
    assert choose(logits, _state(temperature=0.0)) == 2


def test_logit_bias_can_force_and_ban_tokens() -> None:
    logits = torch.tensor([5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert choose(logits, _state(temperature=0.0, logit_bias=((0, -100.0),))) == 1
    assert choose(logits, _state(temperature=0.0, logit_bias=((7, 100.0),))) == 7


def test_frequency_and_presence_penalties_follow_openai_definition() -> None:
    logits = torch.tensor([2.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    st = _state(temperature=0.0, frequency_penalty=0.3)
    st.record(0)
    assert choose(logits, st) == 0  # 2.0 - 0.3 > 1.5
    st.record(0)
    assert choose(logits, st) == 1  # 2.0 - 0.6 < 1.5
    st2 = _state(temperature=0.0, presence_penalty=0.6)
    st2.record(0)
    st2.record(0)
    assert choose(logits, st2) == 1  # presence counts once: 2.0 - 0.6 < 1.5


def test_repetition_penalty_covers_prompt_ids() -> None:
    logits = torch.tensor([2.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    st = SamplerState(SamplingParams(temperature=0.0, repetition_penalty=1.5), 8, (0,))
    assert choose(logits, st) == 1  # 2.0 / 1.5 < 1.5


def test_same_seed_same_draws_and_different_seed_differs() -> None:
    logits = torch.zeros(8)
    draws = lambda seed: [choose(logits, st) for st in [_state(seed=seed)] for _ in range(40)]  # noqa: E731
    assert draws(123) == draws(123)
    assert draws(123) != draws(124)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.tensor([0.0, 2.0, 1.9, 0.0, 0.0, 0.0, 0.0, 0.0])
    for seed in range(20):
        assert choose(logits, _state(seed=seed, top_k=1)) == 1
        assert choose(logits, _state(seed=seed, top_p=0.01)) == 1


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.7, 0.3, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]))
    st = _state(seed=0)
    picks = [choose(logits, st) for _ in range(2000)]
    assert abs(picks.count(0) / 2000 - 0.7) < 0.05


def test_logprobs_are_the_model_distribution_over_the_full_row() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    chosen, top = logprob_entries(logits, 1, 2, decodable=3)
    lse = math.log(sum(math.exp(v) for v in [1.0, 2.0, 3.0, 0.5]))
    assert abs(chosen - (2.0 - lse)) < 1e-6
    assert [i for i, _ in top] == [2, 1]


def test_invalid_scores_fall_back_like_the_reference() -> None:
    logits = torch.full((8,), float("nan"))
    assert choose(logits, _state(temperature=0.0)) == 5
    assert choose(logits, _state(seed=3)) == 5
