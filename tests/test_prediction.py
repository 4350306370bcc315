"""Predicted Outputs (OpenAI's ``prediction``): the client's expected answer drafts speculative
decoding for its own request, with or without ``--speculative``.  Outputs are exactly those
of the same request without a prediction (greedy and seeded, alone and batched, under a
grammar); a right prediction saves most forward passes; a wrong one costs no error; usage
reports ``accepted_prediction_tokens`` / ``rejected_prediction_tokens``."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from adapters.base import Prompt, SamplingParams, Usage
from adapters.demo import ensure_demo_checkpoint
from adapters.registry import load_chat_model
from adapters.runtime.engine import Engine
from adapters.runtime.speculative import (
    PREDICTION_DRAFT_TOKENS,
    Drafter,
    PredictionLookup,
    SpeculativeConfig,
    prediction_usage,
)
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.conftest import checkpoint_dir, oracle, requires_reference
from tests.server import running_server
from tests.test_engine import Collector, spec
from tests.test_metrics import scrape
from tests.test_speculative import PROMPT, PROMPTS, SPEC
from tests.toys import ByteTokenizer, CopyLM

# ------------------------------------------------------------------ the lookup


def test_prediction_drafts_from_its_cursor() -> None:
    lookup = PredictionLookup([1, 2, 3, 4, 5, 6], n_max=3)
    assert lookup.propose(3) == [1, 2, 3]  # nothing generated yet: the prediction's start
    lookup.observe([1, 2])
    assert (lookup.cursor, lookup.synced, lookup.streak) == (2, True, 2)
    assert lookup.propose(8) == [3, 4, 5, 6]
    lookup.observe([1, 2, 9])  # an id the prediction lacks: the cursor waits there
    assert (lookup.cursor, lookup.synced, lookup.streak) == (2, False, 0)
    lookup.observe([1, 2, 9, 3, 4])  # back on it (an insertion)
    assert (lookup.cursor, lookup.synced, lookup.streak) == (4, True, 2)
    lookup.observe([1, 2, 9, 3, 4, 5, 6, 7])  # past its end
    assert lookup.propose(4) == []


def test_prediction_reanchors_forward_of_the_cursor() -> None:
    # "a b X c d a b Y c d": after a deletion the answer's "c d" occurs twice in the prediction
    pred = [1, 2, 7, 3, 4, 1, 2, 8, 3, 4, 5]
    lookup = PredictionLookup(pred, n_max=2)
    lookup.observe([1, 2, 7, 3, 4, 1, 2])  # cursor 7 (on the 8)
    lookup.observe([1, 2, 7, 3, 4, 1, 2, 3])  # the 8 dropped: "2 3" is not in it; "3" is, twice
    assert lookup.cursor == 9  # the "3" at 8 (the one after the cursor, not the one at 3)
    assert lookup.propose(3) == [4, 5]
    # an earlier occurrence nearer the cursor loses to the first one after it (an identical
    # line earlier in a file is not where an edited answer resumes) ...
    forward = PredictionLookup([7, 3, 0, 0, 0, 0, 0, 0, 0, 3, 1], n_max=2)
    forward.observe([7, 3, 0, 0, 3])
    assert forward.cursor == 10 and forward.propose(2) == [1]
    forward.observe([7, 3, 0, 0, 3, 1, 7])  # ... unless none follows
    assert forward.cursor == 1


def test_usage_counts_the_prediction_ids_the_answer_has_in_order() -> None:
    """OpenAI's accepted / rejected prediction tokens: an answer that replaced one "line" of 12
    ids, one that left a predicted line out, one that repeats itself, a wrong one."""
    answer = list(range(1000, 1300))
    replaced = answer[:150] + list(range(5000, 5012)) + answer[162:]
    assert prediction_usage(replaced, answer) == (288, 12)
    longer = answer[:150] + list(range(5000, 5012)) + answer[150:]
    assert prediction_usage(longer, answer) == (300, 12)
    loop = [i % 62 for i in range(300)]  # a loop: the edit is still found where it is
    assert prediction_usage(loop[:150] + list(range(500, 512)) + loop[162:], loop) == (288, 12)
    assert prediction_usage([5, 5, 5], [5, 5, 5, 5, 5]) == (3, 0)
    assert prediction_usage(list(range(100)), list(range(200, 300))) == (0, 100)
    assert prediction_usage([], answer) == (0, 0)


def test_usage_of_a_long_prediction_is_counted_in_linear_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the alignment budget (a client picks the prediction and can steer the answer into
    difflib's slow cases) the count is a greedy in-order match: the same on a replaced or a
    left-out line, a common subsequence (never more than difflib's) on a loop, each prediction
    id counted once."""
    import adapters.runtime.speculative as speculative

    answer = list(range(1000, 1300))
    replaced = answer[:150] + list(range(5000, 5012)) + answer[162:]
    longer = answer[:150] + list(range(5000, 5012)) + answer[150:]
    loop = [i % 62 for i in range(300)]
    edited_loop = loop[:150] + list(range(500, 512)) + loop[162:]
    monkeypatch.setattr(speculative, "ALIGN_BUDGET", 0)
    assert prediction_usage(replaced, answer) == (288, 12)
    assert prediction_usage(longer, answer) == (300, 12)
    assert 150 <= prediction_usage(edited_loop, loop)[0] <= 288
    assert prediction_usage([5, 5, 5], [5, 5, 5, 5, 5]) == (3, 0)
    assert prediction_usage(list(range(100)), list(range(200, 300))) == (0, 100)
    # a sparse copy (difflib's slow case: seconds) of a 32k-id prediction, with the real
    # budget: difflib is not asked, and the count follows the copy
    monkeypatch.undo()

    def no_difflib(*args: object, **kwargs: object) -> None:
        raise AssertionError("difflib aligned a prediction past the budget")

    monkeypatch.setattr(speculative.difflib, "SequenceMatcher", no_difflib)
    gen = random.Random(0)
    prediction = [gen.randrange(1000) for _ in range(32_000)]
    copy = [t for start in range(0, 32_000, 8) for t in prediction[start:start + 3]]
    accepted, rejected = prediction_usage(prediction, copy)
    assert accepted >= len(copy) * 0.9 and accepted + rejected == len(prediction)


def test_drafter_prefers_the_prediction_and_resyncs_after_a_pause() -> None:
    config = SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=1, pause=50,
                               min_acceptance=0.4)
    prediction = list(range(10, 40))
    drafter = Drafter(config, [10, 11, 99], prediction, prompt_lookup=False)
    assert drafter.longest == PREDICTION_DRAFT_TOKENS  # a prediction drafts longer
    assert drafter.propose([10], 100) == list(range(11, 15))  # half the longest at first
    drafter.record(4, 4)
    generated = list(range(10, 15))
    assert drafter.propose(generated, 100) == list(range(15, 23))
    drafter.record(8, 1)  # 5 of 12 kept: go on; the answer leaves the prediction (an edit)
    generated += [15, 1]
    assert drafter.propose(generated, 100) == [16, 17]  # it may come back here
    drafter.record(2, 0)  # 5 of 14 < 40 %: pause for 50 steps
    generated += [2]
    assert drafter.propose(generated, 100) == []
    generated += [16, 17, 18]  # back on the prediction, three ids in a row: drafting resumes
    assert drafter.propose(generated, 100) == [19]
    # without a prediction nothing changes: the prompt lookup alone
    plain = Drafter(config, [10, 11, 99, 10])
    assert plain.prediction is None and plain.propose([], 100) == [11]


# ------------------------------------------------------------------ the engine (a toy model)


def _run(engine: Engine, prompt: bytes, prediction: bytes | None = None, **params) -> Collector:
    c = Collector()
    engine.submit(Prompt(tuple(prompt), SamplingParams(**params),
                         prediction_ids=None if prediction is None else tuple(prediction)), c)
    return c


def _answers(engine: Engine, prompts: list[bytes], predictions: list[bytes | None],
             **params) -> list[tuple]:
    cs = [_run(engine, p, pred, **params) for p, pred in zip(prompts, predictions, strict=True)]
    return [(c.final.finish_reason, c.text, c.final.usage.completion_tokens,
             [(lp.token, lp.logprob) for d in c.deltas for lp in d.logprobs]) for c in cs]


def _copy_engine(**kw) -> Engine:
    return Engine(CopyLM(), ByteTokenizer(), spec(), name="copy", prefix_cache=False, **kw)


@pytest.mark.parametrize("params", [
    {"max_tokens": 60},
    {"max_tokens": 60, "temperature": 0.8, "seed": 7},
    {"max_tokens": 60, "temperature": 1.0, "top_p": 0.9, "seed": 3, "frequency_penalty": 0.3},
    {"max_tokens": 80, "stop": ("on the h", "log")},
    {"max_tokens": 5},
])
@pytest.mark.parametrize("speculative", [None, SPEC])
def test_a_prediction_changes_no_output(params: dict, speculative: SpeculativeConfig | None
                                        ) -> None:
    """Right, half-right and garbage predictions, mixed with requests without one: every answer
    is plain decoding's, batched and alone, with and without ``--speculative``."""
    params = {"temperature": 0.0, **params}
    plain, fast = _copy_engine(), _copy_engine(speculative=speculative)
    try:
        expected = _answers(plain, PROMPTS, [None] * len(PROMPTS), **params)
        right = expected[0][1].encode()
        predictions = [right, right[:20] + b"zzz" + right[25:], b"#!garbage%@" * 9, None]
        assert _answers(fast, PROMPTS, predictions, **params) == expected
        solo = [_answers(fast, [p], [pred], **params)[0]
                for p, pred in zip(PROMPTS, predictions, strict=True)]
        assert solo == expected
        assert fast.drafted_tokens > fast.accepted_tokens > 0
        assert fast.counts()["speculative_drafted"] == fast.drafted_tokens  # on /metrics too
    finally:
        plain.close()
        fast.close()


def test_a_right_prediction_is_accepted_and_saves_forward_passes() -> None:
    plain, fast = _copy_engine(), _copy_engine()  # no --speculative
    try:
        prompt = b"xq1 zv2 " + PROMPT
        a = _run(plain, prompt, max_tokens=120, temperature=0.0)
        assert a.final.finish_reason == "length"
        calls = plain.model.calls  # type: ignore[attr-defined]
        answer = a.text.encode()
        b = _run(fast, prompt, answer, max_tokens=120, temperature=0.0)
        assert b.final.finish_reason == "length"
        assert b.text == a.text and b.final.usage.completion_tokens == 120
        details = b.final.usage.completion_tokens_details
        assert details is not None
        assert details.accepted_prediction_tokens == len(answer) == 120
        assert details.rejected_prediction_tokens == 0
        # one prefill, then up to PREDICTION_DRAFT_TOKENS + 1 ids per forward (the first
        # drafts are shorter): far fewer than one forward per id
        fast_calls = fast.model.calls  # type: ignore[attr-defined]
        assert calls == 120 and fast_calls < 120 / 5
        fast.close()  # the engine thread's counters are final
        # each decode step kept its accepted drafts and one id more
        assert fast.accepted_tokens == fast.drafted_tokens == 120 - fast_calls
        assert a.final.usage.completion_tokens_details is None  # no prediction: no details
    finally:
        plain.close()
        fast.close()


def test_a_garbage_prediction_costs_no_error_and_is_rejected() -> None:
    plain, fast = _copy_engine(), _copy_engine()
    try:
        a = _run(plain, PROMPT, max_tokens=80, temperature=0.0)
        garbage = bytes(range(160, 250))
        b = _run(fast, PROMPT, garbage, max_tokens=80, temperature=0.0)
        a.final  # noqa: B018 (waits for it)
        assert (b.final.finish_reason, b.text) == (a.final.finish_reason, a.text)
        details = b.final.usage.completion_tokens_details
        assert details is not None
        assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == \
            (0, len(garbage))
        # drafting switched itself off: a few drafts verified, not one per step
        assert 0 < fast.drafted_tokens < 20 and fast.accepted_tokens == 0
        empty = _run(fast, PROMPT, b"", max_tokens=10, temperature=0.0)
        assert empty.final.usage.completion_tokens_details is not None  # 0 and 0: it was given
    finally:
        plain.close()
        fast.close()


# ------------------------------------------------------------------ real families


def _predicted(engine: Engine, ids: tuple[int, ...], prediction: list[int] | None,
               params: SamplingParams) -> tuple[list[int], Usage]:
    c = Collector()
    seq = engine.submit(Prompt(ids, params, prediction_ids=None if prediction is None
                               else tuple(prediction)), c)
    usage = c.final.usage
    assert usage is not None
    return list(seq.generated), usage


def _counting_forwards(model: object) -> list[int]:
    """Count ``model``'s forward calls (one per prefill chunk or decode step)."""
    calls = [0]
    for name in ("forward", "forward_batch"):
        inner = getattr(model, name)

        def counted(*args: object, _inner: object = inner, **kwargs: object) -> object:
            calls[0] += 1
            return _inner(*args, **kwargs)  # type: ignore[operator]
        setattr(model, name, counted)
    return calls


@requires_reference
@pytest.mark.parametrize("name", ["chatglm-6b-tiny", "chatglm2-6b-tiny",
                                  "chatglm3-6b-tiny-safetensors"])
def test_reference_checkpoints_answer_as_without_a_prediction(name: str) -> None:
    """On THUDM's tiny reference checkpoints: the greedy answer as its own prediction is taken
    whole in far fewer forward passes; an edited one and a wrong one change nothing; seeded
    sampling neither."""
    loaded = load_chat_model("m", checkpoint_dir(name), dtype="float32", device="cpu",
                             prefix_cache=False)
    engine = loaded.engine
    calls = _counting_forwards(loaded.model)
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    try:
        for case in oracle(name)["cases"][:2]:
            ids = tuple(case["inputs"]["input_ids"][0])
            before = calls[0]
            expected, _ = _predicted(engine, ids, None, greedy)
            plain_calls, before = calls[0] - before, calls[0]
            got, usage = _predicted(engine, ids, expected, greedy)
            assert got == expected, case["case"]
            details = usage.completion_tokens_details
            assert details is not None
            assert details.accepted_prediction_tokens == len(expected)
            assert calls[0] - before < plain_calls / 3, case["case"]
            for params in (greedy, SamplingParams(temperature=0.9, top_p=0.95, seed=11,
                                                  max_tokens=30)):
                want, _ = _predicted(engine, ids, None, params)
                edited = want[:10] + [5, 6, 7] + want[14:]
                for prediction in (want, edited, list(range(100, 160))):
                    got, usage = _predicted(engine, ids, prediction, params)
                    assert got == want, (case["case"], params)
                    assert usage.completion_tokens_details is not None
        assert engine.drafted_tokens > engine.accepted_tokens > 0
    finally:
        loaded.close()


def test_grammar_constrained_answers_are_unchanged_with_a_prediction(tmp_path: Path) -> None:
    """Under a JSON schema (demo checkpoint): the answer's own text as prediction, a wrong JSON
    and free text all give plain decoding's valid answers, batched with requests without."""
    from tests.test_grammar_engine import load, request, run_all, valid

    model = load(ensure_demo_checkpoint(tmp_path))
    try:
        questions = ['Answer like {"name":"abc","n":5,"ok":true} please', "2 + 2 = ?"]
        for params in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 4}):
            reqs = [request(q, **params) for q in questions]  # type: ignore[arg-type]
            expected = [(t, d.finish_reason) for t, d in run_all(model, reqs)]
            assert all(reason == "stop" and valid(text) for text, reason in expected)
            predictions = [expected[0][0], '{"name":"zzzzzzzz","n":99,"ok":false}',
                           "Sure! Here is the JSON you asked for."]
            for prediction in predictions:
                got = run_all(model, [replace(r, prediction=prediction) for r in reqs] + reqs)
                assert [(t, d.finish_reason) for t, d in got] == expected * 2
                assert all(d.usage is not None and d.usage.completion_tokens_details is not None
                           for _, d in got[:2])
        assert model.status()["speculative_accepted"] > 0
    finally:
        model.close()


# ------------------------------------------------------------------ over HTTP


def test_served_prediction_with_the_openai_client(tmp_path: Path) -> None:
    """The official client's ``prediction=``: the same answers, streamed and not, with
    ``usage.completion_tokens_details``; bad shapes and OpenAI's unsupported combinations are
    400s naming the field, and the server keeps serving; the drafts count on /metrics."""
    folder = ensure_demo_checkpoint(tmp_path)
    settings = ServerSettings(models=(
        ModelEntry(id="demo", path=folder, dtype="float32", device="cpu"),))
    with running_server(create_app(settings), timeout=60, wait_ready=True) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Repeat: the quick brown fox jumps over it."}]

        def ask(**extra: object) -> openai.types.chat.ChatCompletion:
            return client.chat.completions.create(model="demo", messages=messages,  # type: ignore[arg-type]
                                                  max_tokens=48, temperature=0, **extra)

        plain = ask()
        text = plain.choices[0].message.content
        assert text and plain.usage is not None
        assert plain.usage.completion_tokens_details is None  # no prediction: no details
        right = ask(prediction={"type": "content", "content": text})
        assert right.choices[0].message.content == text
        assert right.usage is not None and right.usage.completion_tokens_details is not None
        details = right.usage.completion_tokens_details
        # all but an id or two (the text re-tokenized may split its first word differently)
        assert details.accepted_prediction_tokens >= right.usage.completion_tokens - 2
        assert details.reasoning_tokens == 0
        wrong = ask(prediction={"type": "content",
                                "content": [{"type": "text", "text": "Nothing like "},
                                            {"type": "text", "text": "the answer at all."}]})
        assert wrong.choices[0].message.content == text
        assert wrong.usage is not None and wrong.usage.completion_tokens_details is not None
        assert wrong.usage.completion_tokens_details.rejected_prediction_tokens > 0
        assert wrong.usage.completion_tokens == plain.usage.completion_tokens

        stream = client.chat.completions.create(
            model="demo", messages=messages, max_tokens=48, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
            prediction={"type": "content", "content": text})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.accepted_prediction_tokens == \
            details.accepted_prediction_tokens

        with httpx.Client(base_url=url, timeout=30) as http:
            body = {"model": "demo", "messages": messages, "max_tokens": 4}
            bad = [
                ({"prediction": {"type": "text", "content": "x"}}, "prediction.type"),
                ({"prediction": {"type": "content"}}, "prediction.content"),
                ({"prediction": {"type": "content", "content": 5}}, "prediction.content"),
                ({"prediction": {"type": "content", "content": [{"type": "image_url"}]}},
                 "prediction.content.[0]"),
                ({"prediction": "the answer"}, "prediction"),
                ({"prediction": {"type": "content", "content": "x"}, "n": 2}, "n"),
                ({"prediction": {"type": "content", "content": "x"}, "logprobs": True},
                 "logprobs"),
                ({"prediction": {"type": "content", "content": "x"}, "tools": [
                    {"type": "function", "function": {"name": "f"}}]}, "tools"),
            ]
            for extra, param in bad:
                r = http.post("/v1/chat/completions", json={**body, **extra})
                assert r.status_code == 400, (extra, r.text)
                assert r.json()["error"]["param"] == param, (extra, r.json())
            # tools the model may not call are fine (tool_choice "none")
            ok = http.post("/v1/chat/completions", json={
                **body, "prediction": {"type": "content", "content": text},
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "none"})
            assert ok.status_code == 200, ok.text
            samples = scrape(http.get)
        assert ask().choices[0].message.content == text  # still serving
    drafted = samples["chatglm_gateway_speculative_draft_tokens_total"]
    accepted = samples["chatglm_gateway_speculative_accepted_tokens_total"]
    assert drafted[(("model", "demo"),)] >= accepted[(("model", "demo"),)] > 0
