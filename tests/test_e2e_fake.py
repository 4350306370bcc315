"""End to end: the official ``openai`` client against a real uvicorn server serving fakes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

REPLY = "你好，世界！Hello 😀 world."
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def models() -> dict[str, FakeChatModel]:
    return {
        "fake": FakeChatModel("fake", reply=REPLY, piece_chars=2),
        "echo": FakeChatModel("echo", transform="reverse"),
        "slow": FakeChatModel("slow", reply="x" * 400, delay=0.02),
        "broken": FakeChatModel("broken", reply="abcdef", fail_after=3),
    }


@pytest.fixture(scope="module")
def base_url(models: dict[str, FakeChatModel]) -> Iterator[str]:
    settings = ServerSettings(
        sse_ping_seconds=0.05,  # pings (SSE comments) on every slow stream: the SDK must skip them
        models=(ModelEntry(id="fake", path="unused", aliases=("gpt-4o-mini",)),),
    )
    with running_server(create_app(settings, models=models)) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_non_streaming_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="fake", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "fake"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == (len(REPLY) + 1) // 2
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_alias_resolves_to_the_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.model == "fake"
    assert completion.choices[0].message.content == REPLY


def test_stream_concatenation_equals_non_stream(client: openai.OpenAI) -> None:
    kwargs = dict(model="echo", messages=[{"role": "user", "content": "流式输出 🚀 works"}],
                  max_tokens=9)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == "skrow 🚀 出"  # 9 pieces of the reversed text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert whole.choices[0].finish_reason == "length"


def test_stop_and_include_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake", messages=MESSAGES, stop=["😀", "nothing"], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY[: REPLY.index("😀")]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_with_seed_are_reproducible(client: openai.OpenAI,
                                             models: dict[str, FakeChatModel]) -> None:
    kwargs = dict(model="fake", messages=MESSAGES, n=3, seed=7, temperature=1.0)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert all(sorted(t or "") == sorted(REPLY) for t in texts)  # a rotation of the reply
    assert [p.seed for p in models["fake"].calls[-3:]] == [7, 8, 9]
    stream = client.chat.completions.create(**kwargs, stream=True)
    streamed = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_logprobs(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="fake", messages=MESSAGES, logprobs=True, top_logprobs=2, max_tokens=3
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [t.token for t in content] == ["你好", "，世", "界！"]
    assert bytes(content[0].bytes or []).decode() == "你好"
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    stream = client.chat.completions.create(
        model="fake", messages=MESSAGES, logprobs=True, top_logprobs=1, max_tokens=3, stream=True
    )
    tokens = [t.token for c in stream if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content or []]
    assert tokens == ["你好", "，世", "界！"]


def test_error_statuses_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="missing", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="fake", messages=MESSAGES, temperature=3)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=10**6)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")
    # and the server keeps serving
    assert client.chat.completions.create(model="fake", messages=MESSAGES).choices


def test_error_after_the_stream_started(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="broken", messages=MESSAGES, stream=True)
    received = ""
    with pytest.raises(openai.APIError) as failed:
        for chunk in stream:
            received += chunk.choices[0].delta.content or ""
    assert received == "abc"
    assert isinstance(failed.value.body, dict)
    assert failed.value.body["type"] == "server_error"
    assert set(failed.value.body) == {"message", "type", "param", "code"}


def test_models_endpoint(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["fake", "echo", "slow", "broken"]
    model = client.models.retrieve("fake")
    assert model.owned_by == "chatglm-gateway"
    assert model.model_extra is not None and model.model_extra["context_length"] == 4096


def test_async_client_streaming_and_not(base_url: str) -> None:
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused",
                                      max_retries=0) as aclient:
            whole = await aclient.chat.completions.create(model="fake", messages=MESSAGES)
            stream = await aclient.chat.completions.create(
                model="fake", messages=MESSAGES, stream=True
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return whole.choices[0].message.content or "", "".join(parts)

    whole, streamed = asyncio.run(run())
    assert whole == streamed == REPLY


def test_models_answer_while_a_slow_generation_runs(
    base_url: str, models: dict[str, FakeChatModel]
) -> None:
    slow = models["slow"]
    before = slow.counters.finished
    result: dict[str, object] = {}

    def generate() -> None:
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
            result["completion"] = c.chat.completions.create(
                model="slow", messages=MESSAGES, max_tokens=60)  # ~1.2 s of generation

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        _wait_for(lambda: slow.counters.active == 1)
        response = httpx.get(f"{base_url}/v1/models", timeout=5)
        assert response.status_code == 200
        # answered while the generation was still running (it needs ~1.2 s in total)
        assert slow.counters.active == 1
    finally:
        worker.join(timeout=10)
    assert slow.counters.finished == before + 1


def test_disconnect_mid_stream_cancels_generation(
    base_url: str, models: dict[str, FakeChatModel]
) -> None:
    slow = models["slow"]
    cancelled = slow.counters.cancelled
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", timeout=10, json={
        "model": "slow", "messages": MESSAGES, "stream": True,
    }) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        _wait_for(lambda: slow.counters.produced > 0)
    # leaving the block closed the connection after a few of the 400 pieces
    _wait_for(lambda: slow.counters.cancelled == cancelled + 1)
    assert slow.counters.active == 0
    produced = slow.counters.produced
    time.sleep(0.2)
    assert slow.counters.produced == produced < 400


def test_disconnect_during_non_streaming_request_cancels(
    base_url: str, models: dict[str, FakeChatModel]
) -> None:
    slow = models["slow"]
    cancelled = slow.counters.cancelled
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", timeout=0.3, json={
            "model": "slow", "messages": MESSAGES,
        })
    _wait_for(lambda: slow.counters.cancelled == cancelled + 1)
    assert slow.counters.active == 0


def test_server_keeps_serving_after_bad_requests(base_url: str) -> None:
    bad_bodies = [
        b"{not json", b"[]", b"", b'{"model": "fake"}',
        b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "n": 0}',
        b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}',
    ]
    with httpx.Client(base_url=base_url, timeout=5) as http:
        for body in bad_bodies:
            response = http.post("/v1/chat/completions", content=body,
                                 headers={"content-type": "application/json"})
            assert response.status_code == 400, body
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert http.get("/health").json() == {"status": "ok"}
        ok = http.post("/v1/chat/completions", json={"model": "fake", "messages": MESSAGES})
        assert ok.status_code == 200


def _wait_for(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
