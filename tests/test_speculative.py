"""Speculative decoding by prompt lookup: drafting, the switch-off, and that the engine's output is
exactly plain decoding's (greedy and seeded sampling; stop strings, logprobs, max_tokens, KV
budget, metrics counters) on a toy induction-head model where drafts are often but not always
right."""

from __future__ import annotations

import math
import time

import pytest
import torch

from adapters.base import Prompt, SamplingParams
from adapters.runtime.engine import Engine
from adapters.runtime.sampler import SamplerState, choose
from adapters.runtime.speculative import Drafter, PromptLookup, SpeculativeConfig
from tests.test_engine import Collector, spec
from tests.toys import ByteTokenizer, CopyLM

SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)
PROMPT = b"the cat sat on the mat; the cat sat on the hat; the dog sat on the log. "


def test_lookup_drafts_what_followed_the_longest_match() -> None:
    lookup = PromptLookup([1, 2, 3, 9, 2, 3, 4, 5, 6, 7, 1, 2, 3], n_min=1, n_max=3)
    # [1, 2, 3] occurred at the start (followed by 9); the shorter [2, 3] later (followed by 4)
    assert lookup.propose(3) == [9, 2, 3]
    lookup.sync([8])  # ... 2, 3, 8: no n-gram ending in 8 occurred before
    assert lookup.propose(3) == []


def test_lookup_prefers_the_most_recent_occurrence_and_continues_a_loop() -> None:
    lookup = PromptLookup([5, 6, 1, 5, 6, 2, 5, 6], n_min=2, n_max=2)
    assert lookup.propose(1) == [2]
    loop = PromptLookup([7, 8, 9, 7, 8, 9, 7], n_min=1, n_max=3)
    assert loop.propose(6) == [8, 9, 7, 8, 9, 7]  # period 3, drafted past the sequence's end


def test_lookup_respects_the_shortest_ngram() -> None:
    assert PromptLookup([4, 1, 2, 3, 4], n_min=2, n_max=3).propose(2) == []
    assert PromptLookup([4, 1, 2, 3, 4], n_min=1, n_max=3).propose(2) == [1, 2]


def test_drafting_pauses_when_acceptance_is_low_and_comes_back() -> None:
    config = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, pause=3)
    drafter = Drafter(config, [1, 1, 1])
    assert drafter.propose([], 10) == [1, 1]  # the first draft is half the longest
    drafter.record(2, 2)  # accepted whole: the next is twice as long
    assert drafter.propose([], 10) == [1, 1, 1, 1]
    drafter.record(4, 1)  # a rejection: the next draft is what was accepted plus one
    assert drafter.propose([], 10) == [1, 1]
    drafter.record(2, 0)  # the last three kept 3 of 8: go on
    assert drafter.propose([], 10) == [1]
    drafter.record(1, 0)  # 3 of 9 < 35 %: pause
    assert [drafter.propose([], 10) for _ in range(3)] == [[], [], []]  # paused 3 steps
    assert drafter.propose([], 10) == [1]
    drafter.record(1, 0)
    assert drafter.propose([], 10) == [1]
    drafter.record(1, 0)
    assert [drafter.propose([], 10) for _ in range(6)] == [[]] * 6  # the next pause is longer
    assert drafter.propose([], 10) == [1]
    drafter.record(1, 1)  # accepted whole: the drafts grow back, the pauses start short again
    assert drafter.propose([], 10) == [1, 1]
    drafter.record(2, 2)
    assert drafter.propose([], 10) == [1, 1, 1, 1]
    assert drafter.propose([], 3) == [1, 1, 1]  # bounded by the caller (max_tokens, context)
    drafter.record(3, 0)  # the recent successes still count: kept 3 of 6, 3 of 7
    drafter.record(1, 0)
    assert drafter.propose([], 10) == [1]
    drafter.record(1, 0)  # the last four kept 2 of 7: pause, 3 steps again
    assert [drafter.propose([], 10) for _ in range(4)] == [[], [], [], [1]]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig(prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="unknown"):
        SpeculativeConfig(method="eagle")  # type: ignore[arg-type]


def test_verifying_a_one_hot_draft_keeps_the_distribution() -> None:
    """Rejection sampling against a one-hot draft ``t``: the draft is accepted with probability
    p(t); a rejection samples the residual (p without t, renormalised); so the emitted token
    follows p.  The engine verifies by sampling each row as plain decoding does and keeping the
    draft when the pick equals it; measured here over many seeded draws."""
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log()
    draft, trials = 3, 20000
    params = SamplingParams(temperature=1.0, seed=1234)
    state = SamplerState(params, decodable=len(probs))
    accepted, residual = 0, torch.zeros(len(probs))
    for _ in range(trials):
        token = choose(logits, state)  # the engine's verification of row 0 against the draft
        if token == draft:
            accepted += 1
        else:
            residual[token] += 1
    p_t = float(probs[draft])
    sigma = math.sqrt(p_t * (1 - p_t) / trials)
    assert abs(accepted / trials - p_t) < 4 * sigma
    expected = probs.clone()
    expected[draft] = 0
    expected /= expected.sum()
    rejected = trials - accepted
    for j in range(len(probs)):
        if j == draft:
            assert residual[j] == 0
            continue
        q = float(expected[j])
        assert abs(float(residual[j]) / rejected - q) < 4 * math.sqrt(q * (1 - q) / rejected)


def run(engine: Engine, prompt: bytes, **params) -> Collector:
    c = Collector()
    engine.submit(Prompt(tuple(prompt), SamplingParams(**params)), c)
    return c


def _engine(**kw) -> Engine:
    return Engine(CopyLM(), ByteTokenizer(), spec(), name="copy", prefix_cache=False, **kw)


def _texts(engine: Engine, prompts: list[bytes], **params) -> list:
    cs = [run(engine, prompt=p, **params) for p in prompts]
    return [(c.final.finish_reason, c.text, c.final.usage.completion_tokens,
             [(lp.token, lp.logprob) for d in c.deltas for lp in d.logprobs]) for c in cs]


# The toy copies after the last id's latest occurrence, the drafter after the longest n-gram's:
# after "xab1 yb2 a" + "b" they disagree ("1" / "2"), so greedy drafts get rejected too.
PROMPTS = [PROMPT, PROMPT[10:] + b"the cat", b"xab1 yb2 a", b"no repeats: xyz"]


@pytest.mark.parametrize("params", [
    {"max_tokens": 60},
    {"max_tokens": 60, "temperature": 0.8, "seed": 7},
    {"max_tokens": 60, "temperature": 1.0, "top_p": 0.9, "seed": 3, "frequency_penalty": 0.3},
    {"max_tokens": 40, "logprobs": True, "top_logprobs": 2},
    {"max_tokens": 80, "stop": ("on the h", "log")},
    {"max_tokens": 7},
])
def test_speculation_changes_no_output(params: dict) -> None:
    """Greedy and seeded sampling, penalties, logprobs, stop strings and max_tokens: every
    request gives exactly what plain decoding gives, alone and four at once, while drafts were
    verified and many accepted."""
    plain, fast = _engine(), _engine(speculative=SPEC)
    try:
        params = {"temperature": 0.0, **params}
        expected = _texts(plain, PROMPTS, **params)
        assert _texts(fast, PROMPTS, **params) == expected
        if params["max_tokens"] >= 40:  # copying: fewer forward calls than tokens emitted
            assert fast.model.calls < plain.model.calls  # type: ignore[attr-defined]
        solo = [_texts(fast, [p], **params)[0] for p in PROMPTS]
        assert solo == expected
        assert fast.accepted_tokens > 0
        assert fast.drafted_tokens > fast.accepted_tokens  # rejections happened too
        counts = fast.counts()
        assert counts["speculative_drafted"] == fast.drafted_tokens
        assert counts["speculative_accepted"] == fast.accepted_tokens
        assert "speculative_drafted" not in plain.counts()
    finally:
        plain.close()
        fast.close()


def test_stop_string_inside_an_accepted_draft_ends_there() -> None:
    plain, fast = _engine(), _engine(speculative=SPEC)
    try:
        prompt = b"one two three four five six; one two three four five six; one"
        a = run(plain, prompt=prompt, max_tokens=40, temperature=0.0, stop=("e one o",))
        b = run(fast, prompt=prompt, max_tokens=40, temperature=0.0, stop=("e one o",))
        assert (b.final.finish_reason, b.text) == (a.final.finish_reason, a.text) == ("stop", " on")
        assert b.final.usage.completion_tokens == a.final.usage.completion_tokens
        assert fast.accepted_tokens > 0  # the stop string was found in accepted draft ids
    finally:
        plain.close()
        fast.close()


def test_kv_budget_preemption_with_speculation_keeps_answers() -> None:
    free, tight = _engine(), _engine(speculative=SPEC, kv_cache_bytes=100 * 150)
    try:
        prompts = [PROMPT[i:i + 40] for i in range(0, 32, 8)]
        expected = _texts(free, prompts, max_tokens=30, temperature=0.0)
        assert _texts(tight, prompts, max_tokens=30, temperature=0.0) == expected
        assert tight.preempted > 0 and tight.accepted_tokens > 0
    finally:
        free.close()
        tight.close()


def test_caches_hold_exactly_the_accepted_ids() -> None:
    """Rejected drafts are cut from the cache: a finished request's cache (kept for prefix
    reuse) holds the prompt and every generated id but the last, nothing drafted after."""
    engine = Engine(CopyLM(), ByteTokenizer(), spec(), name="copy", speculative=SPEC)
    try:
        c = run(engine, prompt=PROMPT, max_tokens=50, temperature=0.9, seed=5)
        assert c.final.finish_reason in ("length", "stop")
        assert engine.drafted_tokens > engine.accepted_tokens > 0
        [entry] = list(engine.prefix._entries.values())
        held = entry.ids
        assert list(entry.cache.ids) == list(held)  # type: ignore[attr-defined]
        assert len(held) == len(PROMPT) + c.final.usage.completion_tokens - 1
    finally:
        engine.close()


def test_cancel_with_drafts_in_flight_frees_the_request() -> None:
    engine = Engine(CopyLM(), ByteTokenizer(), spec(), name="copy", speculative=SPEC)
    try:
        c = Collector()
        seq = engine.submit(Prompt(tuple(b"ab ab ab ab"), SamplingParams(
            temperature=0.0, max_tokens=400)), c)
        while len(c.deltas) < 3:
            time.sleep(0.001)
        engine.cancel(seq)
        deadline = time.monotonic() + 5
        while engine.counts()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seq.done and seq.cache is None
        assert len(seq.generated) < 400 and engine.accepted_tokens > 0
        calls = engine.model.calls  # type: ignore[attr-defined]
        time.sleep(0.05)
        assert engine.model.calls == calls  # type: ignore[attr-defined]
        after = run(engine, PROMPT, max_tokens=20, temperature=0.0)  # still serving
        assert after.final.finish_reason == "length"
    finally:
        engine.close()
