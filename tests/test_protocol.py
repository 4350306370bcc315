"""The wire schema: what is accepted, what is a 400 (and which ``param`` it names), and the
translation to the adapters' frozen dataclasses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.base import Message, SamplingParams, Tool, ToolCall
from gateway import protocol as p
from gateway.errors import RequestInvalid
from gateway.protocol import validated

USER = {"role": "user", "content": "hi"}


def parse(**fields: Any) -> p.ChatCompletionRequest:
    body = {"model": "m", "messages": [USER], **fields}
    return validated(p.ChatCompletionRequest, json.dumps(body).encode())


def rejected(raw: bytes | dict[str, Any]) -> RequestInvalid:
    body = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    with pytest.raises(RequestInvalid) as caught:
        validated(p.ChatCompletionRequest, body)
    assert caught.value.status_code == 400
    assert caught.value.error_type == "invalid_request_error"
    return caught.value


def test_minimal_request_gets_adapter_defaults() -> None:
    request = parse()
    assert request.to_sampling_params() == SamplingParams()
    assert request.to_messages() == (Message(role="user", content="hi"),)
    assert request.choices == 1 and not request.stream and not request.include_usage


def test_every_sampling_field_is_translated() -> None:
    request = parse(
        temperature=0, top_p=0.5, top_k=40, max_tokens=10, stop="\n", seed=3,
        presence_penalty=-2, frequency_penalty=2, repetition_penalty=1.1,
        logit_bias={"13": 5, "2": -100}, logprobs=True, top_logprobs=20,
    )
    assert request.to_sampling_params() == SamplingParams(
        max_tokens=10, temperature=0.0, top_p=0.5, top_k=40, stop=("\n",), seed=3,
        presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1.1,
        logit_bias=((2, -100.0), (13, 5.0)), logprobs=True, top_logprobs=20,
    )
    assert request.to_sampling_params().greedy


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse(max_tokens=5, max_completion_tokens=7).to_sampling_params().max_tokens == 7
    assert parse(max_completion_tokens=7).to_sampling_params().max_tokens == 7


def test_content_parts_and_null_assistant_content() -> None:
    request = parse(messages=[
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "x", "type": "function",
             "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "x"},
        {"role": "user", "content": "你好", "name": "li"},
    ])
    assert request.to_messages() == (
        Message("system", "be brief"), Message("developer", "dev"), Message("user", "a\nb"),
        Message("assistant", "", tool_calls=(ToolCall("f", '{"a": 1}', "x"),)),
        Message("tool", "42", tool_call_id="x"), Message("user", "你好", name="li"),
    )


def test_ignored_and_unknown_fields_are_accepted() -> None:
    ignored = {name: {"anything": [1]} for name in p.IGNORED_FIELDS}
    request = parse(**ignored, some_future_field=True)
    assert request.to_sampling_params() == SamplingParams()
    assert set(p.IGNORED_FIELDS) <= set(p.ChatCompletionRequest.model_fields)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[]", None),
        ({"messages": [USER]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": 5, "messages": [USER]}, "model"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "messages.[0].role"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages.[0].role"),
        ({"model": "m", "messages": [USER, {"role": "user"}]}, "messages.[1]"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"},
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
         "messages.[0].content.[1]"),
        ({"model": "m", "messages": [USER], "temperature": "0.5"}, "temperature"),
        ({"model": "m", "messages": [USER], "temperature": 2.5}, "temperature"),
        ({"model": "m", "messages": [USER], "temperature": -0.1}, "temperature"),
        ({"model": "m", "messages": [USER], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [USER], "top_p": 1.5}, "top_p"),
        ({"model": "m", "messages": [USER], "top_k": -1}, "top_k"),
        ({"model": "m", "messages": [USER], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [USER], "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "messages": [USER], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"model": "m", "messages": [USER], "n": 0}, "n"),
        ({"model": "m", "messages": [USER], "n": 17}, "n"),
        ({"model": "m", "messages": [USER], "n": True}, "n"),
        ({"model": "m", "messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "messages": [USER], "stop": ""}, "stop"),
        ({"model": "m", "messages": [USER], "stop": ["a", ""]}, "stop"),
        ({"model": "m", "messages": [USER], "stop": [1]}, "stop.[0]"),
        ({"model": "m", "messages": [USER], "presence_penalty": 2.5}, "presence_penalty"),
        ({"model": "m", "messages": [USER], "frequency_penalty": -3}, "frequency_penalty"),
        ({"model": "m", "messages": [USER], "repetition_penalty": 0}, "repetition_penalty"),
        ({"model": "m", "messages": [USER], "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": "m", "messages": [USER], "logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"model": "m", "messages": [USER], "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "messages": [USER], "logprobs": False, "top_logprobs": 2},
         "top_logprobs"),
        ({"model": "m", "messages": [USER], "logprobs": True, "top_logprobs": 21},
         "top_logprobs"),
        ({"model": "m", "messages": [USER], "logprobs": "yes"}, "logprobs"),
        ({"model": "m", "messages": [USER], "stream": "true"}, "stream"),
        ({"model": "m", "messages": [USER], "stream_options": {"include_usage": True}},
         "stream_options"),
        ({"model": "m", "messages": [USER], "seed": 1.5}, "seed"),
    ],
)
def test_invalid_requests_name_the_field(body: bytes | dict[str, Any], param: str | None) -> None:
    error = rejected(body)
    assert error.param == param
    assert error.message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty",
                                   "repetition_penalty"])
def test_nan_and_infinity_are_rejected(field: str, literal: str) -> None:
    raw = f'{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], "{field}": {literal}}}'
    assert rejected(raw.encode()).param == field


def test_malformed_json_says_so() -> None:
    error = rejected(b'{"model": "m",')
    assert error.code == "invalid_json"
    assert "JSON" in error.message


def test_missing_field_is_named() -> None:
    error = rejected({"messages": [USER]})
    assert error.code == "missing_required_parameter"
    assert "'model'" in error.message


def test_chunk_serialization_matches_openai() -> None:
    chunk = p.ChatCompletionChunk(
        id="chatcmpl-1", created=1, model="m",
        choices=[p.ChunkChoice(index=0, delta=p.ChoiceDelta(role="assistant", content=""))],
    )
    assert json.loads(chunk.model_dump_json()) == {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}],
        "system_fingerprint": None,
    }
    finish = p.ChunkChoice(index=0, delta=p.ChoiceDelta(), finish_reason="stop")
    assert finish.model_dump()["delta"] == {}


def test_completion_id_shape() -> None:
    first, second = p.completion_id(), p.completion_id()
    assert first.startswith("chatcmpl-") and first != second


def test_tools_are_offered_unless_tool_choice_is_none() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    request = parse(messages=[{"role": "user", "content": "hi"}], tools=tools)
    assert request.to_tools() == (Tool("get_weather", "天气", tools[0]["function"]["parameters"]),)
    assert parse(messages=[{"role": "user", "content": "hi"}], tools=tools,
                 tool_choice="none").to_tools() == ()


@pytest.mark.parametrize("tools", [
    [{"type": "function"}],
    [{"type": "retrieval", "function": {"name": "x"}}],
    [{"type": "function", "function": {"name": ""}}],
    "not a list",
])
def test_malformed_tools_are_400(tools) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestInvalid):
        parse(messages=[{"role": "user", "content": "hi"}], tools=tools)
