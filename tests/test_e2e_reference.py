"""End to end against THUDM's reference: real checkpoint folders served by a real uvicorn server,
queried with the official ``openai`` client, compared with what the reference code computed.

For each oracle case: ``temperature=0, max_tokens=16`` gives exactly the official ``chat()`` answer,
``usage.prompt_tokens`` is the official prompt length, the first token's top logprobs equal the
reference logits minus their logsumexp, and the streamed deltas concatenate to the same answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest

from adapters.chatglm2.tools import TOOLS_PROMPT, parse_call
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.conftest import checkpoint_dir, oracle, requires_reference
from tests.server import running_server

pytestmark = requires_reference

MODELS = ["chatglm-6b-tiny", "chatglm2-6b-tiny", "chatglm3-6b-tiny-safetensors"]


def _messages(case: dict, family: str) -> tuple[list[dict], list[dict] | None]:
    """The OpenAI messages (and tools) equivalent to the oracle's (query, history)."""
    msgs: list[dict] = []
    tools = None
    if family == "v3":
        for turn in case["history"]:
            if "tools" in turn:
                # ChatGLM3's tool system message is what the gateway writes for `tools`
                assert turn["content"] == TOOLS_PROMPT
                tools = [{"type": "function", "function": t} for t in turn["tools"]]
            elif turn.get("metadata"):
                call = parse_call(turn["metadata"], turn["content"])
                assert call is not None
                msgs.append({"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}]})
            else:
                msgs.append({"role": "tool" if turn["role"] == "observation" else turn["role"],
                             "content": turn["content"]})
        msgs.append({"role": "tool" if case["role"] == "observation" else "user",
                     "content": case["query"], "tool_call_id": "call_1"})
        return msgs, tools
    for q, a in case["history"]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": case["query"]}], None


def _cases() -> list[tuple[str, str]]:
    out = []
    for name in MODELS:
        try:
            data = oracle(name)
        except pytest.skip.Exception:
            return [("none", "none")]
        for case in data["cases"]:
            out.append((name, case["case"]))
    return out


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    settings = ServerSettings(models=tuple(
        ModelEntry(id=name, path=checkpoint_dir(name), dtype="float32", device="cpu")
        for name in MODELS
    ))
    with running_server(create_app(settings), timeout=120, wait_ready=True) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(("name", "case_name"), _cases())
def test_answer_usage_and_logprobs_match_reference(client: openai.OpenAI, name: str,
                                                   case_name: str) -> None:
    data = oracle(name)
    case = next(c for c in data["cases"] if c["case"] == case_name)
    messages, tools = _messages(case, data["family"])
    extra = {"tools": tools} if tools else {}
    r = client.chat.completions.create(
        model=name, messages=messages, temperature=0, max_tokens=16, logprobs=True,
        top_logprobs=5, **extra,
    )
    choice = r.choices[0]
    assert choice.message.content == case["chat_response"]
    assert r.usage.prompt_tokens == len(case["inputs"]["input_ids"][0])
    assert choice.finish_reason == "length"

    lse = case["last_logits_stats"]["logsumexp"]
    expected = [v - lse for v in case["last_logits_topk"]["values"][:5]]
    first = choice.logprobs.content[0]
    got = [alt.logprob for alt in first.top_logprobs]
    assert len(got) == 5
    for g, e in zip(got, expected, strict=True):
        assert math.isclose(g, e, abs_tol=1e-3), (got, expected)
    assert math.isclose(first.logprob, expected[0], abs_tol=1e-3)

    stream = client.chat.completions.create(
        model=name, messages=messages, temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True}, **extra,
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
    assert "".join(pieces) == case["chat_response"]
    assert all("\ufffd" not in p for p in pieces)
    assert usage is not None and usage.prompt_tokens == r.usage.prompt_tokens


def test_models_lists_both_families(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert set(MODELS) <= ids


def test_context_length_exceeded_names_the_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODELS[0], messages=[{"role": "user", "content": "hi"}], max_tokens=100_000)
    body = err.value.body
    assert body["code"] == "context_length_exceeded"
    assert "512" in body["message"] and "100000" in body["message"].replace(",", "")
