"""Deltas -> SSE: the exact event sequence and byte format, merging n choices, and closing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from adapters.base import ChatRequest, Delta, Usage
from gateway import sse
from gateway.app import create_app
from gateway.chat_stream import chunks, collect
from gateway.choices import ChoiceStream
from gateway.generation import CompletionMeta
from gateway.settings import ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

META = CompletionMeta(id="chatcmpl-test", created=1, model="m", system_fingerprint="fp_x")


class Scripted:
    """An async iterator of fixed Deltas that records whether it was closed."""

    def __init__(self, *deltas: Delta, fail_at: int | None = None) -> None:
        self.deltas = list(deltas)
        self.fail_at = fail_at
        self.closed = False
        self.position = 0

    def __aiter__(self) -> Scripted:
        return self

    async def __anext__(self) -> Delta:
        await asyncio.sleep(0)
        if self.position == self.fail_at:
            raise RuntimeError("engine exploded")
        if self.position >= len(self.deltas):
            raise StopAsyncIteration
        self.position += 1
        return self.deltas[self.position - 1]

    async def aclose(self) -> None:
        self.closed = True


def finished(reason: str = "stop", completion: int = 2) -> Delta:
    return Delta(finish_reason=reason, usage=Usage(5, completion))  # type: ignore[arg-type]


async def events(*generations: Scripted, include_usage: bool = False) -> list[Any]:
    stream = ChoiceStream(generations)
    await stream.prime()
    out = [e async for e in sse.events(chunks(stream, META, len(generations), include_usage),
                                        stream)]
    return [e if e == "[DONE]" else json.loads(e) for e in out]


def test_single_choice_event_sequence() -> None:
    gen = Scripted(Delta("你"), Delta(""), Delta("好😀"), Delta("!", finish_reason="stop",
                                                              usage=Usage(5, 3)))
    out = asyncio.run(events(gen, include_usage=True))
    assert out[-1] == "[DONE]"
    chunks = out[:-1]
    assert all(c["id"] == "chatcmpl-test" and c["object"] == "chat.completion.chunk"
               for c in chunks)
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "你"},  # the empty Delta was skipped
        {"content": "好😀"},
        {"content": "!"},
        {},
        None,
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0}}
    assert "usage" not in chunks[0]
    assert gen.closed


def test_no_usage_chunk_unless_asked() -> None:
    out = asyncio.run(events(Scripted(Delta("a"), finished())))
    assert out[-1] == "[DONE]" and out[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in out[:-1])


def test_n_choices_are_interleaved_with_their_index() -> None:
    a = Scripted(Delta("a1"), Delta("a2"), finished(completion=2))
    b = Scripted(Delta("b1"), finished(completion=1))
    out = asyncio.run(events(a, b, include_usage=True))
    chunks = out[:-1]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    texts = {0: "", 1: ""}
    finishes = []
    for c in chunks[2:-1]:
        choice = c["choices"][0]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes.append(choice["index"])
    assert texts == {0: "a1a2", 1: "b1"}
    assert sorted(finishes) == [0, 1]
    # prompt counted once, completions summed (OpenAI's n>1 accounting)
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0}}


def test_error_after_start_is_one_error_event_without_done() -> None:
    gen = Scripted(Delta("a"), Delta("b"), fail_at=2)
    out = asyncio.run(events(gen))
    assert [c["choices"][0]["delta"] for c in out[:3]] == [
        {"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}]
    assert set(out[3]) == {"error"}
    assert out[3]["error"]["type"] == "server_error"
    assert "exploded" not in out[3]["error"]["message"]
    assert len(out) == 4 and gen.closed


def test_model_reported_error_and_cancel_become_error_events() -> None:
    out = asyncio.run(events(Scripted(Delta("a"), finished("error"))))
    assert out[-1]["error"]["code"] == "internal_error"
    out = asyncio.run(events(Scripted(Delta("a"), finished("cancelled"))))
    assert out[-1]["error"]["code"] == "generation_cancelled"


def test_collect_aggregates_like_the_stream() -> None:
    async def run() -> Any:
        stream = ChoiceStream([Scripted(Delta("x"), Delta("y", finish_reason="length",
                                                            usage=Usage(4, 2))),
                               Scripted(Delta("z"), finished(completion=1))])
        try:
            return await collect(stream, META, 2)
        finally:
            await stream.aclose()

    completion = asyncio.run(run())
    assert [c.message.content for c in completion.choices] == ["xy", "z"]
    assert [c.finish_reason for c in completion.choices] == ["length", "stop"]
    # no prediction: no completion_tokens_details on the wire
    assert completion.model_dump(mode="json")["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0}}
    assert completion.choices[0].logprobs is None


def test_prime_surfaces_first_step_failures_and_aclose_closes_everything() -> None:
    async def run() -> tuple[Scripted, Scripted]:
        ok, bad = Scripted(Delta("a"), finished()), Scripted(fail_at=0)
        stream = ChoiceStream([bad, ok])
        with pytest.raises(RuntimeError):
            await stream.prime()
        await stream.aclose()
        await stream.aclose()  # idempotent
        return ok, bad

    ok, bad = asyncio.run(run())
    assert ok.closed and bad.closed


def test_generation_without_finish_reason_is_an_error() -> None:
    out = asyncio.run(events(Scripted(Delta("a"))))
    assert out[-1]["error"]["type"] == "server_error"


def test_closing_mid_generation_cancels_the_model() -> None:
    fake = FakeChatModel(reply="abcdefgh", delay=0.01)

    async def run() -> None:
        from adapters.base import Message

        prompt = fake.prepare(ChatRequest((Message("user", "hi"),)))
        stream = ChoiceStream([fake.generate(prompt), fake.generate(prompt)])
        await stream.prime()
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(run())
    assert fake.counters.cancelled == 2 and fake.counters.active == 0
    assert fake.counters.produced < 16


# --------------------------------------------------------------------------- raw bytes


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    models = {"fake": FakeChatModel("fake", reply="流 式😀 ok", piece_chars=2),
              "slow": FakeChatModel("slow", reply="abcdef", delay=0.06)}
    with running_server(create_app(ServerSettings(sse_ping_seconds=0.05), models=models)) as url:
        yield url


def raw_stream(base_url: str, **body: Any) -> tuple[httpx.Response, bytes]:
    payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True, **body}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=payload,
                      timeout=10) as response:
        return response, b"".join(response.iter_raw())


def test_raw_sse_bytes(base_url: str) -> None:
    response, raw = raw_stream(base_url, model="fake", stream_options={"include_usage": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert b"\r" not in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    events = events[:-1]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    assert b"event:" not in raw and b"\nid:" not in raw and not raw.startswith(b"id:")
    payloads = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads
                   if p["choices"]) == "流 式😀 ok"
    assert payloads[-2]["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 4
    # the UTF-8 goes out as is, not \\u-escaped
    assert "😀".encode() in raw


def test_keep_alive_pings_are_comments(base_url: str) -> None:
    _, raw = raw_stream(base_url, model="slow")
    events = raw.split(b"\n\n")[:-1]
    pings = [e for e in events if e.startswith(b":")]
    assert pings, "a 0.36 s stream with a 0.05 s ping interval should carry pings"
    assert all(e.startswith(b"data: ") or e.startswith(b": ") for e in events)
    assert events[-1] == b"data: [DONE]"


def test_errors_before_the_stream_are_plain_json(base_url: str) -> None:
    response, raw = raw_stream(base_url, model="nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert json.loads(raw)["error"]["code"] == "model_not_found"
