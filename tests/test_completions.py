"""POST /v1/completions: OpenAI's legacy completions, through the official client and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from adapters.base import ChatRequest, Message
from gateway.app import create_app
from gateway.settings import ModelEntry, SamplingDefaults, ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

REPLY = "你好，世界！Hello 😀 world."


@pytest.fixture(scope="module")
def models() -> dict[str, FakeChatModel]:
    return {
        "fake": FakeChatModel("fake", reply=REPLY, piece_chars=2),
        "echo": FakeChatModel("echo", transform="reverse"),
        "tuned": FakeChatModel("tuned", reply="x" * 100),
        "broken": FakeChatModel("broken", reply="abcdef", fail_after=3),
    }


@pytest.fixture(scope="module")
def base_url(models: dict[str, FakeChatModel]) -> Iterator[str]:
    settings = ServerSettings(models=(
        ModelEntry(id="fake", path=Path("unused"), aliases=("gpt-3.5-turbo-instruct",)),
        ModelEntry(id="tuned", path=Path("unused"),
                   defaults=SamplingDefaults(max_tokens=5, temperature=0.3, top_p=0.6)),
    ))
    with running_server(create_app(settings, models=models)) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_string_prompt_is_one_user_turn(client: openai.OpenAI,
                                        models: dict[str, FakeChatModel]) -> None:
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="写一首诗",
                                           max_tokens=100)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.model == "fake"
    (choice,) = completion.choices
    assert (choice.index, choice.text, choice.finish_reason, choice.logprobs) == (
        0, REPLY, "stop", None)
    assert list(models["fake"].requests[-1].messages) == [Message(role="user", content="写一首诗")]
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == len("user: 写一首诗")  # the fake's tokens are characters
    assert usage.completion_tokens == (len(REPLY) + 1) // 2
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_defaults_to_16_as_openai(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="echo", prompt="abcdefghijklmnopqrstuvwxyz")
    assert completion.choices[0].text == "zyxwvutsrqponmlk"  # 16 one-character pieces
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 16


def test_model_defaults_apply_when_the_request_omits_them(
    client: openai.OpenAI, models: dict[str, FakeChatModel]
) -> None:
    tuned = models["tuned"]
    assert client.completions.create(model="tuned", prompt="p").choices[0].text == "xxxxx"
    assert (tuned.calls[-1].temperature, tuned.calls[-1].top_p, tuned.calls[-1].max_tokens) == (
        0.3, 0.6, 5)
    client.completions.create(model="tuned", prompt="p", temperature=1.5, max_tokens=7)
    assert (tuned.calls[-1].temperature, tuned.calls[-1].top_p, tuned.calls[-1].max_tokens) == (
        1.5, 0.6, 7)
    # chat completions use the same defaults
    chat = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "p"}])
    assert chat.choices[0].message.content == "xxxxx"
    assert tuned.calls[-1].temperature == 0.3


def test_list_of_prompts_times_n(client: openai.OpenAI, models: dict[str, FakeChatModel]) -> None:
    completion = client.completions.create(model="echo", prompt=["abc", "xyz"], n=2, seed=3,
                                           temperature=0)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert [c.text for c in completion.choices] == ["cba", "cba", "zyx", "zyx"]
    assert [p.seed for p in models["echo"].calls[-4:]] == [3, 4, 3, 4]
    assert completion.usage is not None
    # the prompts' tokens summed once each (OpenAI's accounting), completions summed per choice
    assert completion.usage.prompt_tokens == 2 * len("user: abc")
    assert completion.usage.completion_tokens == 12


def test_stream_chunks_and_usage(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="echo", prompt=["ab", "cde"], stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: "ba", 1: "edc"}
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_sse_ending_with_done(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=10, json={
        "model": "echo", "prompt": "xy", "stream": True, "echo": True,
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"] == [{"text": "xy", "index": 0, "logprobs": None,
                                 "finish_reason": None}]  # the echoed prompt comes first
    assert "usage" not in first


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="echo", prompt="abc", echo=True)
    assert completion.choices[0].text == "abccba"


def test_logprobs_legacy_shape(client: openai.OpenAI, base_url: str) -> None:
    completion = client.completions.create(model="fake", prompt="hi", logprobs=2, max_tokens=3)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["你好", "，世", "界！"]
    assert logprobs.token_logprobs == [0.0, -0.125, -0.25]
    assert logprobs.text_offset == [0, 2, 4]
    assert logprobs.top_logprobs == [{"你好": 0.0, "<alt1>": -1.0},
                                     {"，世": -0.125, "<alt1>": -1.125},
                                     {"界！": -0.25, "<alt1>": -1.25}]
    # logprobs=0: no alternatives, but the chosen token's own logprob is always there
    raw = httpx.post(f"{base_url}/v1/completions", json={
        "model": "fake", "prompt": "hi", "logprobs": 0, "max_tokens": 2}).json()
    assert raw["choices"][0]["logprobs"] == {
        "tokens": ["你好", "，世"], "token_logprobs": [0.0, -0.125],
        "top_logprobs": [{"你好": 0.0}, {"，世": -0.125}], "text_offset": [0, 2]}
    # streamed: offsets continue across chunks
    stream = client.completions.create(model="fake", prompt="hi", logprobs=1, max_tokens=3,
                                       stream=True)
    offsets = [o for c in stream for ch in c.choices if ch.logprobs
               for o in ch.logprobs.text_offset or []]
    assert offsets == [0, 2, 4]


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    """The prompt's tokens come first (OpenAI's shape: the first has null logprob and null
    top_logprobs), then the answer's; offsets run over the whole text."""
    completion = client.completions.create(model="fake", prompt="hey", echo=True, logprobs=1,
                                           max_tokens=2)
    (choice,) = completion.choices
    assert choice.text == "hey你好，世"
    logprobs = choice.logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["h", "e", "y", "你好", "，世"]
    assert logprobs.token_logprobs == [None, 0.0, -0.125, 0.0, -0.125]
    assert logprobs.top_logprobs == [None, {"e": 0.0}, {"y": -0.125}, {"你好": 0.0},
                                     {"，世": -0.125}]
    assert logprobs.text_offset == [0, 1, 2, 3, 5]


def test_max_tokens_0_scores_the_prompt_only(client: openai.OpenAI, base_url: str) -> None:
    completion = client.completions.create(model="fake", prompt=["ab", "xyz"], echo=True,
                                           logprobs=0, max_tokens=0, n=2)
    assert [c.text for c in completion.choices] == ["ab", "ab", "xyz", "xyz"]
    assert {c.finish_reason for c in completion.choices} == {"length"}
    assert [c.logprobs.tokens for c in completion.choices if c.logprobs] == [
        ["a", "b"], ["a", "b"], ["x", "y", "z"], ["x", "y", "z"]]
    assert completion.choices[2].logprobs is not None
    assert completion.choices[2].logprobs.token_logprobs == [None, 0.0, -0.125]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 0
    # without logprobs the echo alone comes back
    raw = httpx.post(f"{base_url}/v1/completions", json={
        "model": "fake", "prompt": "ab", "echo": True, "max_tokens": 0}).json()
    assert raw["choices"][0] == {"text": "ab", "index": 0, "logprobs": None,
                                 "finish_reason": "length"}


def test_streamed_echo_carries_the_prompt_logprobs(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=10, json={
        "model": "fake", "prompt": "hey", "stream": True, "echo": True, "logprobs": 1,
        "max_tokens": 1,
    }) as response:
        assert response.status_code == 200
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                  if line.startswith("data: {")]
    choices = [e["choices"][0] for e in events]
    assert choices[0] == {"text": "hey", "index": 0, "finish_reason": None, "logprobs": {
        "tokens": ["h", "e", "y"], "token_logprobs": [None, 0.0, -0.125],
        "top_logprobs": [None, {"e": 0.0}, {"y": -0.125}], "text_offset": [0, 1, 2]}}
    assert choices[1]["text"] == "你好"
    assert choices[1]["logprobs"]["text_offset"] == [3]  # the answer follows the echo
    assert choices[-1]["finish_reason"] == "length"


def test_stop_sequences(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="fake", prompt="hi", stop=["😀"], max_tokens=50)
    assert completion.choices[0].text == REPLY[: REPLY.index("😀")]
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": [[1, 2]]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "suffix": "tail"}, "suffix"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # scoring only: needs echo
    ({"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({}, "prompt"),
])
def test_invalid_requests_are_400(base_url: str, body: dict[str, object], param: str) -> None:
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "fake", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_best_of_equal_to_n_is_accepted(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="echo", prompt="ab", n=2, best_of=2)
    assert [c.text for c in completion.choices] == ["ba", "ba"]


def test_errors_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="missing", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="fake", prompt="x", max_tokens=10**6)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="broken", prompt="x")


def test_error_after_the_stream_started(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="broken", prompt="x", stream=True)
    received = ""
    with pytest.raises(openai.APIError) as failed:
        for chunk in stream:
            received += "".join(c.text for c in chunk.choices)
    assert received == "abc"
    assert isinstance(failed.value.body, dict) and failed.value.body["type"] == "server_error"


def test_overload_is_429_with_retry_after(base_url: str) -> None:
    full = FakeChatModel("full", reply="x" * 50, delay=0.05, max_running=0)
    with running_server(create_app(ServerSettings(), models={"full": full})) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "full", "prompt": "x"})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_async_client(base_url: str) -> None:
    import asyncio

    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused",
                                      max_retries=0) as aclient:
            whole = await aclient.completions.create(model="echo", prompt="hello")
            stream = await aclient.completions.create(model="echo", prompt="hello", stream=True)
            parts = [c.choices[0].text async for c in stream if c.choices]
            return whole.choices[0].text, "".join(parts)

    assert asyncio.run(run()) == ("olleh", "olleh")


def test_demo_checkpoint_end_to_end(tmp_path: Path) -> None:
    """The real ChatGLM2 code path: chat prompt format, engine, detokenizer, usage."""
    from adapters.demo import ensure_demo_checkpoint
    from adapters.registry import load_chat_model

    model = load_chat_model("demo", ensure_demo_checkpoint(tmp_path), device="cpu",
                            dtype="float32")
    try:
        with running_server(create_app(ServerSettings(), models={"demo": model})) as url, \
                openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            kwargs = dict(model="demo", prompt=["你好", "hello"], max_tokens=6, temperature=0,
                          logprobs=2)
            whole = client.completions.create(**kwargs)  # type: ignore[call-overload]
            streamed = ["", ""]
            for chunk in client.completions.create(**kwargs, stream=True):  # type: ignore[call-overload]
                for choice in chunk.choices:
                    streamed[choice.index] += choice.text
        assert [c.text for c in whole.choices] == streamed
        # the prompt went through ChatGLM2's chat format: "[Round 1]\n\n问：你好\n\n答："
        chat_ids = model.prepare(ChatRequest((Message("user", "你好"),))).token_ids
        assert whole.usage is not None
        hello_ids = model.prepare(ChatRequest((Message("user", "hello"),))).token_ids
        assert whole.usage.prompt_tokens == len(chat_ids) + len(hello_ids)
        for choice in whole.choices:
            assert choice.logprobs is not None
            assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
            assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
            assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
    finally:
        model.close()
