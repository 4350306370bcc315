from __future__ import annotations

import threading
import time

import pytest
import torch

from adapters.base import Delta, Overloaded, Prompt, SamplingParams
from adapters.conversation import to_pairs
from adapters.family import FamilySpec
from adapters.runtime.engine import Engine
from adapters.weights.format import QuantLayout
from tests.toys import ByteTokenizer, ScriptedLM


class Identity:
    def __init__(self, tools: bool = False) -> None:
        self.tool_calls = ()

    def feed(self, text: str) -> str:
        return text

    def finish(self) -> str:
        return ""


def spec(drop_last: bool = False) -> FamilySpec:
    return FamilySpec(
        description="toy", claims=lambda folder, config: False,
        stop_ids=frozenset({ByteTokenizer.eos}), load_tokenizer=None,  # type: ignore[arg-type]
        load_model=None, read_config=None, to_conversation=to_pairs,  # type: ignore[arg-type]
        build_prompt=None, new_postprocessor=Identity,  # type: ignore[arg-type]
        tool_grammar=lambda tools, choice: None,
        quant_layout=QuantLayout("layers.", ("dense",), torch.float32),
        drop_last_token_on_length=drop_last,
    )


class Collector:
    def __init__(self) -> None:
        self.deltas: list[Delta] = []
        self.done = threading.Event()

    def __call__(self, d: Delta) -> None:
        self.deltas.append(d)
        if d.finish_reason:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def final(self) -> Delta:
        assert self.done.wait(10), "generation did not finish"
        return self.deltas[-1]


def run(engine: Engine, prompt=b"hi", **params) -> Collector:
    c = Collector()
    p = SamplingParams(temperature=0.0, **{"max_tokens": 100, **params})
    engine.submit(Prompt(tuple(prompt), p), c)
    return c


@pytest.fixture
def make_engine():
    engines: list[Engine] = []

    def make(script: str, **kw) -> Engine:
        drop = kw.pop("drop_last", False)
        e = Engine(ScriptedLM(script.encode()), ByteTokenizer(), spec(drop), name="toy", **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()


def test_generates_script_then_stops_on_eos(make_engine) -> None:
    e = make_engine("你好 😀 ok")
    c = run(e)
    assert c.final.finish_reason == "stop"
    assert c.text == "你好 😀 ok"
    assert c.final.usage.completion_tokens == len("你好 😀 ok".encode()) + 1  # + eos
    assert c.final.usage.prompt_tokens == 2
    assert all("\ufffd" not in d.text for d in c.deltas)


def test_max_tokens_finishes_with_length(make_engine) -> None:
    c = run(make_engine("abcdef"), max_tokens=3)
    assert (c.final.finish_reason, c.text) == ("length", "abc")


def test_drop_last_token_on_length_reproduces_chatglm3_chat(make_engine) -> None:
    c = run(make_engine("abcdef", drop_last=True), max_tokens=3)
    assert (c.final.finish_reason, c.text, c.final.usage.completion_tokens) == ("length", "ab", 3)


def test_stop_string_is_cut_and_not_returned(make_engine) -> None:
    c = run(make_engine("hello END world"), stop=("END",))
    assert (c.final.finish_reason, c.text) == ("stop", "hello ")


def test_logprobs_have_openai_shape(make_engine) -> None:
    c = run(make_engine("é"), logprobs=True, top_logprobs=2)
    assert c.final.finish_reason == "stop"
    entries = [lp for d in c.deltas for lp in d.logprobs]
    assert len(entries) == 2  # two bytes of "é"
    assert entries[0].token.startswith("bytes:\\x")  # a lone UTF-8 lead byte
    assert entries[0].bytes == (0xC3,)
    assert len(entries[0].top_logprobs) == 2
    assert entries[0].top_logprobs[0].logprob >= entries[0].top_logprobs[1].logprob


def test_concurrent_requests_each_get_their_answer(make_engine) -> None:
    e = make_engine("0123456789")
    cs = [run(e, prompt=bytes([65 + i]) * (i + 1), max_tokens=4 + i) for i in range(6)]
    for i, c in enumerate(cs):
        assert c.final.finish_reason == "length"
        assert c.text == "0123456789"[: 4 + i]


def test_cancel_stops_generation_at_next_step(make_engine) -> None:
    e = make_engine("x" * 10_000)
    lm: ScriptedLM = e.model  # type: ignore[assignment]
    c = Collector()
    seq = e.submit(Prompt((1,), SamplingParams(temperature=0.0, max_tokens=9000)), c)
    while len(c.deltas) < 5:
        time.sleep(0.001)
    e.cancel(seq)
    time.sleep(0.05)
    calls = lm.calls
    time.sleep(0.1)
    assert lm.calls == calls, "engine kept generating for a cancelled request"
    assert seq.cache is None
    assert e.counts() == {"running": 0, "waiting": 0}


def test_model_fault_fails_only_that_step_and_engine_keeps_serving(make_engine) -> None:
    e = make_engine("abc")
    lm: ScriptedLM = e.model  # type: ignore[assignment]
    original = lm.forward
    lm.forward = lambda ids, cache: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    c = run(e)
    assert c.final.finish_reason == "error"
    lm.forward = original  # type: ignore[method-assign]
    c2 = run(e)
    assert (c2.final.finish_reason, c2.text) == ("stop", "abc")


def test_full_queue_is_refused_at_once(make_engine) -> None:
    e = make_engine("x" * 100_000, max_running=1, max_waiting=1)
    run(e, max_tokens=90_000)
    run(e, max_tokens=90_000)
    time.sleep(0.05)
    with pytest.raises(Overloaded):
        run(e)


def _hash_engine(**kw) -> Engine:
    from tests.toys import HashLM

    return Engine(HashLM(), ByteTokenizer(), spec(), name="hash", **kw)


def _conversation_turns(engine: Engine, turns: int = 5) -> list[str]:
    """Each turn's prompt = previous prompt + previous answer + a new question, like a chat
    client resending its history."""
    history, answers = b"", []
    for t in range(turns):
        prompt = history + f"Q{t}: tell me more about item {t}?".encode()
        c = run(engine, prompt=prompt, max_tokens=12)
        assert c.final.finish_reason == "length"
        answers.append(c.text)
        history = prompt + c.text.encode()
    return answers


def test_prefix_reuse_gives_the_same_answers_and_skips_the_shared_history() -> None:
    cold, warm = _hash_engine(prefix_cache=False), _hash_engine(prefix_cache=True)
    try:
        assert _conversation_turns(warm) == _conversation_turns(cold)
        assert warm.prefix.hits == 4
        assert warm.model.fed < cold.model.fed / 2  # type: ignore[attr-defined]
    finally:
        cold.close()
        warm.close()


def test_chunked_prefill_equals_one_shot() -> None:
    one, chunked = _hash_engine(prefix_cache=False), _hash_engine(prefix_cache=False,
                                                                   prefill_chunk=7)
    try:
        prompt = b"a long prompt that is fed seven ids at a time " * 3
        a, b = run(one, prompt=prompt, max_tokens=10), run(chunked, prompt=prompt, max_tokens=10)
        assert a.final.finish_reason == b.final.finish_reason == "length"
        assert a.text == b.text
        assert chunked.model.calls > one.model.calls  # type: ignore[attr-defined]
    finally:
        one.close()
        chunked.close()


def test_kv_budget_preempts_and_recomputes_without_changing_answers() -> None:
    free, tight = _hash_engine(prefix_cache=False), _hash_engine(
        prefix_cache=False, kv_cache_bytes=100 * 60)  # room for ~60 ids in all
    try:
        prompts = [f"request number {i} asks".encode() for i in range(4)]
        expected = []
        for p in prompts:
            c = run(free, prompt=p, max_tokens=30)
            assert c.final.finish_reason == "length"
            expected.append(c.text)
        cs = [run(tight, prompt=p, max_tokens=30) for p in prompts]
        assert [c.final.finish_reason for c in cs] == ["length"] * 4
        assert [c.text for c in cs] == expected
        assert tight.preempted > 0
    finally:
        free.close()
        tight.close()


def test_short_prompts_arriving_together_start_in_the_same_step() -> None:
    from tests.toys import HashLM

    class Recording(HashLM):
        def __init__(self) -> None:
            super().__init__()
            self.log: list[str] = []

        def forward(self, ids, cache):  # type: ignore[no-untyped-def]
            self.log.append("prefill" if cache.length == 0 else "decode")
            return super().forward(ids, cache)

    lm = Recording()
    engine = Engine(lm, ByteTokenizer(), spec(), name="rec", prefix_cache=False,
                    prefill_chunk=64)
    try:
        with engine._cv:  # (re-entrant) the engine thread sees all four at once
            cs = [run(engine, prompt=f"prompt {i}".encode(), max_tokens=3) for i in range(4)]
        assert [c.final.finish_reason for c in cs] == ["length"] * 4
        assert lm.log[:4] == ["prefill"] * 4  # 4 x 8 ids fit one 64-id chunk: no decode between
    finally:
        engine.close()


def test_ending_token_logprob_is_reported_when_asked(make_engine) -> None:
    """A scored echo lists every generated id, the stop id too (as vLLM does); other logprobs
    follow the answer's text."""
    engine = make_engine("ab")
    plain = run(engine, logprobs=True)
    assert plain.final.finish_reason == "stop"
    assert [lp.token for d in plain.deltas for lp in d.logprobs] == ["a", "b"]
    listed = run(engine, logprobs=True, ending_logprobs=True)
    assert listed.final.finish_reason == "stop"
    assert [lp.token for d in listed.deltas for lp in d.logprobs] == ["a", "b", ""]
    assert (listed.text, listed.final.finish_reason) == ("ab", "stop")
    assert listed.final.usage is not None and listed.final.usage.completion_tokens == 3


def test_chatglm3_dropped_last_token_is_listed_when_asked(make_engine) -> None:
    engine = make_engine("abc", drop_last=True)
    c = run(engine, max_tokens=2, logprobs=True, ending_logprobs=True)
    assert c.final.finish_reason == "length"
    assert [lp.token for d in c.deltas for lp in d.logprobs] == ["a", "b"]
    assert (c.text, c.final.finish_reason) == ("a", "length")
