"""Prompt logprobs (``echo`` + ``logprobs``) from the engine, against THUDM's reference numbers.

The engine scores a prompt while it prefills it: the row of position ``i`` gives the logprob of
the id at ``i + 1``.  Fed the reference prompt followed by the reference's greedy ids, every
scored row can be checked against what THUDM's code computed: the ``*-smallvocab`` checkpoints
carry the full last-position logits and the argmax of EVERY prompt position (for ChatGLM-6B
those of its bidirectionally read context, which is what the engine reports there), and every
checkpoint carries the last position's top logits with their logsumexp and the top-5 logits of
each greedy step (whose differences are logprob differences).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence

import pytest
import torch

from adapters.base import Delta, Prompt, PromptLogprobs, SamplingParams, TokenLogprob
from adapters.family import CausalLM, FamilySpec
from adapters.registry import FAMILIES, detect_family
from adapters.runtime.engine import Engine
from tests.conftest import checkpoint_dir, oracle, requires_reference

pytestmark = requires_reference


class IdTokenizer:
    """Shows id ``i`` as ``<i>`` so that the checks read ids back (the smallvocab checkpoints
    have no tokenizer); every id of the padded logits counts as decodable, as the reference's
    top-k does."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise AssertionError("the engine never encodes")

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f"<{i}>" for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return f"<{token_id}>".encode()


def _id(token: str) -> int:
    return int(token[1:-1])


class Collector:
    def __init__(self) -> None:
        self.deltas: list[Delta] = []
        self.done = threading.Event()

    def __call__(self, delta: Delta) -> None:
        self.deltas.append(delta)
        if delta.finish_reason:
            self.done.set()


@functools.cache
def load(name: str) -> tuple[CausalLM, FamilySpec]:
    folder = checkpoint_dir(name)
    spec = FAMILIES[detect_family(folder)]
    model = spec.load_model(folder, spec.read_config(folder), dtype=torch.float32,
                            device=torch.device("cpu"))
    return model, spec


def score(engine: Engine, ids: Sequence[int], span: tuple[int, int] | None = None,
          top: int = 5) -> tuple[PromptLogprobs, Delta]:
    """Score ``ids[span]`` (default: all) with ``max_tokens`` 0: the prompt logprobs and the
    final Delta."""
    collector = Collector()
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=True,
                            top_logprobs=top)
    engine.submit(Prompt(tuple(ids), params, scored=span or (0, len(ids))), collector)
    assert collector.done.wait(60), "scoring did not finish"
    final = collector.deltas[-1]
    assert (final.finish_reason, final.text) == ("length", "")
    assert final.usage is not None and final.usage.completion_tokens == 0
    (scored,) = [d.prompt_logprobs for d in collector.deltas if d.prompt_logprobs is not None]
    assert collector.deltas[0].prompt_logprobs is scored  # the first Delta carries them
    return scored, final


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.close()


def _cases(data: dict) -> list[dict]:
    if "raw" in data:
        return data["raw"]
    return [dict(case, input_ids=case["inputs"]["input_ids"][0]) for case in data["cases"]]


def _check_greedy_steps(entries: Sequence[TokenLogprob], case: dict) -> None:
    """Entry ``k`` scores greedy id ``k``: the reference's top-5 ids of that step, the same
    logprob differences as its logits, and the greedy id is the most likely one."""
    for entry, step, chosen in zip(entries, case["greedy_step_top5"], case["greedy_new_ids"],
                                   strict=True):
        assert _id(entry.token) == chosen
        assert [_id(alt.token) for alt in entry.top_logprobs] == step["ids"]
        got = torch.tensor([alt.logprob - entry.top_logprobs[0].logprob
                            for alt in entry.top_logprobs])
        want = torch.tensor(step["values"]) - step["values"][0]
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
        assert entry.logprob == entry.top_logprobs[0].logprob


@pytest.mark.parametrize(("name", "chunk"), [
    ("chatglm-6b-tiny-smallvocab", 512), ("chatglm-6b-tiny", 512),  # prefix-LM: never chunked
    ("chatglm2-6b-tiny-smallvocab", 512), ("chatglm2-6b-tiny-smallvocab", 7),
    ("chatglm2-6b-tiny", 512), ("chatglm2-6b-tiny", 7),
    ("chatglm3-6b-tiny-safetensors", 512), ("chatglm3-6b-tiny-safetensors", 7),
])
def test_prompt_logprobs_match_the_reference(name: str, chunk: int,
                                             engines: list[Engine]) -> None:
    model, spec = load(name)
    engine = Engine(model, IdTokenizer(model.padded_vocab_size), spec, name=name,
                    prefill_chunk=chunk, prefix_cache=False)
    engines.append(engine)
    for case in _cases(oracle(name)):
        prompt, greedy = case["input_ids"], case["greedy_new_ids"]
        scored, final = score(engine, prompt + greedy)
        assert _id(scored.first) == prompt[0]
        entries = scored.following  # entry j scores id j + 1 from the row of position j
        assert [_id(e.token) for e in entries] == (prompt + greedy)[1:]
        assert final.usage is not None and final.usage.prompt_tokens == len(prompt + greedy)
        last = entries[len(prompt) - 1]  # scores greedy id 0 from the prompt's last position
        if "last_logits" in case:  # the whole row: exact logprobs of everything
            logp = torch.log_softmax(torch.tensor(case["last_logits"], dtype=torch.float64), -1)
            values, ids = logp.topk(5)
            assert [_id(alt.token) for alt in last.top_logprobs] == ids.tolist()
            torch.testing.assert_close(torch.tensor([alt.logprob for alt in last.top_logprobs],
                                                    dtype=torch.float64), values,
                                       atol=1e-4, rtol=0)
            assert abs(last.logprob - float(logp[greedy[0]])) < 1e-4
            # every position's most likely id, the context's included
            argmax = [_id(e.top_logprobs[0].token) for e in entries[: len(prompt)]]
            assert argmax == case["all_positions_argmax"]
        else:  # the top of the row and its logsumexp
            lse = case["last_logits_stats"]["logsumexp"]
            want = [v - lse for v in case["last_logits_topk"]["values"][:5]]
            assert [_id(alt.token) for alt in last.top_logprobs] == \
                case["last_logits_topk"]["ids"][:5]
            for alt, expected in zip(last.top_logprobs, want, strict=True):
                assert abs(alt.logprob - expected) < 1e-4, (alt.logprob, expected)
        _check_greedy_steps(entries[len(prompt) - 1:], case)


def test_a_scored_prompt_reuses_kv_only_before_its_span(engines: list[Engine]) -> None:
    """A cached prefix that reaches into the scored span would leave rows uncomputed: only the
    ids before the span are reused, and the logprobs equal a run without any cache."""
    model, spec = load("chatglm2-6b-tiny")
    case = oracle("chatglm2-6b-tiny")["cases"][2]  # two rounds: a long prompt
    ids = case["inputs"]["input_ids"][0]
    plain = Engine(model, IdTokenizer(model.padded_vocab_size), spec, name="plain",
                   prefix_cache=False)
    cached = Engine(model, IdTokenizer(model.padded_vocab_size), spec, name="cached",
                    prefill_chunk=16)
    engines += [plain, cached]
    span = (40, len(ids))
    want, _ = score(plain, ids, span)
    score(cached, ids, (0, len(ids)))  # leaves the whole prompt in the prefix store
    got, final = score(cached, ids, span)
    assert final.usage is not None
    assert final.usage.prompt_tokens_details.cached_tokens == span[0]
    assert got.first == want.first
    assert [e.token for e in got.following] == [e.token for e in want.following]
    for g, w in zip(got.following, want.following, strict=True):
        assert abs(g.logprob - w.logprob) < 1e-4
    assert len(got.following) == span[1] - span[0] - 1


def test_scoring_then_generating(engines: list[Engine]) -> None:
    """With ``max_tokens`` > 0 the prompt's logprobs come first, then the answer as usual."""
    model, spec = load("chatglm2-6b-tiny-smallvocab")
    engine = Engine(model, IdTokenizer(model.padded_vocab_size), spec, name="both")
    engines.append(engine)
    raw = oracle("chatglm2-6b-tiny-smallvocab")["raw"][0]
    collector = Collector()
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=True, logprobs=True,
                            top_logprobs=1)
    engine.submit(Prompt(tuple(raw["input_ids"]), params, scored=(2, 12)), collector)
    assert collector.done.wait(60)
    first, *rest = collector.deltas
    assert first.prompt_logprobs is not None and first.text == "" and not first.logprobs
    assert _id(first.prompt_logprobs.first) == raw["input_ids"][2]
    assert len(first.prompt_logprobs.following) == 9
    answer = [_id(lp.token) for d in rest for lp in d.logprobs]
    assert answer == raw["greedy_new_ids"][:4]
    assert all(d.prompt_logprobs is None for d in rest)
    assert rest[-1].finish_reason == "length"
