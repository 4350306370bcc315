"""Constrained decoding inside the engine, on the demo checkpoint (a real ChatGLM2 model with
random weights): grammars hold with batching, preemption, prefix reuse, seeds, stop strings,
logprobs and cancellation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.base import ChatRequest, Delta, GrammarSpec, Message, SamplingParams
from adapters.chat_model import TorchChatModel
from adapters.demo import ensure_demo_checkpoint
from adapters.registry import load_chat_model

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 10},
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"}},
    "required": ["name", "n", "ok"], "additionalProperties": False}
JSON = GrammarSpec(kind="json_schema", value=json.dumps(SCHEMA))


def valid(text: str) -> bool:
    data = json.loads(text)
    return (set(data) == {"name", "n", "ok"} and 1 <= len(data["name"]) <= 10
            and isinstance(data["n"], int) and 0 <= data["n"] <= 99
            and isinstance(data["ok"], bool))


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("demo"))


def load(folder: Path, **options: object) -> TorchChatModel:
    return load_chat_model("demo", folder, dtype="float32", device="cpu", **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model(demo_folder: Path) -> Iterator[TorchChatModel]:
    m = load(demo_folder)
    yield m
    m.close()


def request(text: str, grammar: GrammarSpec | None = JSON, **params: object) -> ChatRequest:
    return ChatRequest((Message("user", text),),
                       SamplingParams(**{"max_tokens": 80, "temperature": 0.0, **params}),  # type: ignore[arg-type]
                       grammar=grammar)


async def generate(model: TorchChatModel, req: ChatRequest) -> tuple[str, Delta]:
    text, last = "", None
    async for delta in model.generate(model.prepare(req)):
        text += delta.text
        last = delta
    assert last is not None and last.finish_reason is not None
    return text, last


def run_all(model: TorchChatModel, reqs: list[ChatRequest]) -> list[tuple[str, Delta]]:
    async def main() -> list[tuple[str, Delta]]:
        return await asyncio.gather(*(generate(model, r) for r in reqs))
    return asyncio.run(main())


QUESTIONS = ["你好", "Who are you?", "写一首诗", "2 + 2 = ?"]


def test_batched_answers_equal_solo_and_validate(model: TorchChatModel) -> None:
    solo = [run_all(model, [request(q)])[0] for q in QUESTIONS]
    together = run_all(model, [request(q) for q in QUESTIONS])
    assert [t for t, _ in together] == [t for t, _ in solo]
    for text, last in together:
        assert last.finish_reason == "stop" and valid(text)


def test_preemption_keeps_the_grammar_state(demo_folder: Path, model: TorchChatModel) -> None:
    expected = [run_all(model, [request(q, temperature=0.8, seed=i)])[0][0]
                for i, q in enumerate(QUESTIONS)]
    tight = load(demo_folder, kv_cache_bytes=model.model.kv_bytes_per_token * 120,
                 prefix_cache=False)
    try:
        got = run_all(tight, [request(q, temperature=0.8, seed=i)
                              for i, q in enumerate(QUESTIONS)])
        assert tight.engine.preempted > 0  # the budget forced recompute
    finally:
        tight.close()
    assert [t for t, _ in got] == expected
    assert all(valid(t) for t, _ in got)


def test_prefix_reuse_with_a_grammar(demo_folder: Path) -> None:
    history = [Message("user", "你好" * 8), Message("assistant", "hello there " * 4)]

    def turn(m: TorchChatModel) -> str:
        req = ChatRequest((*history, Message("user", "next")),
                          SamplingParams(max_tokens=80, temperature=0.0), grammar=JSON)
        return run_all(m, [req])[0][0]

    reuse, fresh = load(demo_folder), load(demo_folder, prefix_cache=False)
    try:
        run_all(reuse, [ChatRequest(tuple(history[:1]), SamplingParams(max_tokens=8))])
        first, second = turn(reuse), turn(reuse)
        assert reuse.engine.prefix.hits > 0
        assert first == second == turn(fresh)
    finally:
        reuse.close()
        fresh.close()


def test_seeds_reproduce_and_choices_differ(model: TorchChatModel) -> None:
    req = request("hi", temperature=1.0, seed=42)
    a = run_all(model, [req])[0][0]
    b = run_all(model, [req])[0][0]
    assert a == b and valid(a)
    prompt = model.prepare(req)

    async def choices() -> list[str]:
        async def one(p: object) -> str:
            return "".join([d.text async for d in model.generate(p)])  # type: ignore[arg-type]
        return await asyncio.gather(*(one(p) for p in prompt.choices(3)))

    texts = asyncio.run(choices())
    assert texts[0] == a and all(valid(t) for t in texts)
    assert len(set(texts)) > 1


def test_stop_strings_and_logprobs_with_a_grammar(model: TorchChatModel) -> None:
    text, last = run_all(model, [request("hi", stop=[","])])[0]
    assert last.finish_reason == "stop" and "," not in text and text.startswith('{"name":')

    async def with_logprobs() -> list[Delta]:
        req = request("hi", logprobs=True, top_logprobs=2)
        return [d async for d in model.generate(model.prepare(req))]

    deltas = asyncio.run(with_logprobs())
    entries = [e for d in deltas for e in d.logprobs]
    text = "".join(d.text for d in deltas)
    assert valid(text) and entries
    # the model's own distribution, as OpenAI reports it (a masked-out id is still listed)
    assert all(-9999.0 <= e.logprob <= 0.0 for e in entries)
    assert all(len(e.top_logprobs) == 2 for e in entries)


def test_cancelled_grammar_requests_free_the_engine(model: TorchChatModel) -> None:
    async def main() -> None:
        gen = model.generate(model.prepare(request("hi", max_tokens=200)))
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while model.status()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    status = model.status()
    assert (status["running"], status["waiting"], status["cancelled"]) == (0, 0, 1)
    # and it serves the next request
    text, last = run_all(model, [request("hi")])[0]
    assert last.finish_reason == "stop" and valid(text)


def test_without_a_grammar_nothing_changes(model: TorchChatModel) -> None:
    """The same request without a grammar is free text (the parity tests pin it exactly)."""
    free, _ = run_all(model, [request("hi", grammar=None, max_tokens=20)])[0]
    constrained, _ = run_all(model, [request("hi", max_tokens=20)])[0]
    assert free != constrained and constrained.startswith("{")
