from __future__ import annotations

import math

import pytest
import torch

from adapters.base import SamplingParams
from adapters.runtime.sampler import SamplerState, choose, logprob_entries


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


@pytest.mark.parametrize("n", [10, 4096, 65024, 65024 + 77])
def test_fast_argmax_is_torchs_first_index_of_the_maximum(n: int) -> None:
    from adapters.runtime.sampler import argmax

    gen = torch.Generator().manual_seed(n)
    for trial in range(50):
        # few distinct values: many ties, in the head, the tail and across blocks
        x = torch.randint(0, 5 if trial % 2 else 1000, (n,), generator=gen).float()
        if trial % 5 == 0:
            x[-1] = x.max() + 1  # the maximum alone in the tail
        if trial % 7 == 0:
            x[:] = float("-inf")
            x[n // 2] = 0.0
        assert argmax(x) == int(torch.argmax(x))


def test_invalid_scores_are_still_detected() -> None:
    from adapters.runtime.sampler import _no_valid_scores

    x = torch.zeros(65024)
    assert not _no_valid_scores(x)
    x[3] = float("nan")
    assert _no_valid_scores(x)
    assert _no_valid_scores(torch.full((100,), float("-inf")))
    y = torch.full((100,), float("-inf"))
    y[7] = 1.0
    assert not _no_valid_scores(y)  # masked rows with one finite score are fine
    z = torch.zeros(100)
    z[0] = float("inf")
    assert not _no_valid_scores(z)
