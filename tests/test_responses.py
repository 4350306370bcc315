"""POST /v1/responses through a real uvicorn server and the official ``openai`` SDK
(``client.responses.create`` / ``client.responses.stream``): the fake model for the wire format
(event order, shapes, how input items become the chat conversation, the 400s), the demo
checkpoint as ChatGLM2 and ChatGLM3 for text formats and forced calls a real grammar enforces.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import Delta, GrammarSpec, ToolCall, ToolCallPart, ToolChoice, Usage
from adapters.demo import ensure_demo_checkpoint
from gateway.app import create_app
from gateway.choices import ChoiceStream
from gateway.generation import CompletionMeta
from gateway.responses_protocol import ResponsesRequest
from gateway.responses_stream import ResponsePlan, events
from gateway.settings import ModelEntry, ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "minLength": 1, "maxLength": 10}},
               "required": ["city"], "additionalProperties": False}}
CALL = ToolCall(name="get_weather", arguments='{"city": "Paris"}')

#: OpenAI's order of a streamed one-message answer
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
TEXT_END = ["response.output_text.done", "response.content_part.done",
            "response.output_item.done", "response.completed"]


@pytest.fixture(scope="module")
def fakes() -> dict[str, FakeChatModel]:
    return {"fake": FakeChatModel("fake", piece_chars=3),
            "tooly": FakeChatModel("tooly", tool_call=CALL)}


@pytest.fixture(scope="module")
def base_url(fakes: dict[str, FakeChatModel]) -> Iterator[str]:
    with running_server(create_app(models=fakes)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def sse_events(base_url: str, body: dict) -> list[tuple[str, dict]]:
    """The ``(event name, data)`` pairs of a raw streamed response."""
    with httpx.stream("POST", f"{base_url}/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


# --------------------------------------------------------------------------- text


def test_text_answer_and_usage(client: openai.OpenAI, base_url: str,
                               fakes: dict[str, FakeChatModel]) -> None:
    r = client.responses.create(model="fake", input="hello there", instructions="Be brief.")
    assert r.output_text == "hello there"
    assert r.status == "completed" and r.object == "response" and r.id.startswith("resp_")
    assert r.instructions == "Be brief." and r.store is False
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    # instructions are the system message before the input
    assert fakes["fake"].conversations[-1] == [("system", "Be brief."), ("user", "hello there")]
    prompt_tokens = len("system: Be brief.\nuser: hello there")
    raw = httpx.post(f"{base_url}/v1/responses", json={
        "model": "fake", "input": "hello there", "instructions": "Be brief."}).json()
    assert raw["usage"] == {"input_tokens": prompt_tokens,
                            "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": prompt_tokens + 4}
    assert raw["output"][0]["content"] == [
        {"type": "output_text", "text": "hello there", "annotations": [], "logprobs": []}]


def test_sampling_fields_reach_the_model(client: openai.OpenAI,
                                         fakes: dict[str, FakeChatModel]) -> None:
    r = client.responses.create(model="fake", input="abcdefghijkl", max_output_tokens=2,
                                temperature=0.25, top_p=0.5)
    params = fakes["fake"].requests[-1].params
    assert (params.max_tokens, params.temperature, params.top_p) == (2, 0.25, 0.5)
    assert (r.temperature, r.top_p, r.max_output_tokens) == (0.25, 0.5, 2)
    # cut by max_output_tokens: OpenAI's "incomplete"
    assert r.output_text == "abcdef"
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"


def test_message_items_with_text_parts(client: openai.OpenAI,
                                       fakes: dict[str, FakeChatModel]) -> None:
    r = client.responses.create(model="fake", input=[
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "answer", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": "again"},
                                     {"type": "input_text", "text": "now"}]},
    ])
    assert r.output_text == "again\nnow"
    assert fakes["fake"].conversations[-1] == [
        ("developer", "Rules."), ("user", "first"), ("assistant", "answer"),
        ("user", "again\nnow")]


def test_stream_events_in_openais_order(client: openai.OpenAI, base_url: str) -> None:
    events = sse_events(base_url, {"model": "fake", "input": "streaming!"})
    names = [name for name, _ in events]
    deltas = ["str", "eam", "ing", "!"]
    assert names == TEXT_EVENTS + ["response.output_text.delta"] * len(deltas) + TEXT_END
    # every event names itself twice (SSE event and data type) and is numbered from 0
    assert [data["type"] for _, data in events] == names
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert [d["delta"] for n, d in events if n == "response.output_text.delta"] == deltas
    created, completed = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["usage"] is None and created["id"] == completed["id"]
    item_id = events[2][1]["item"]["id"]
    assert all(d["item_id"] == item_id for _, d in events[3:-2])
    assert events[-4][1]["text"] == "streaming!"
    assert completed["status"] == "completed"
    assert completed["output"][0]["content"][0]["text"] == "streaming!"
    assert completed["usage"]["output_tokens"] == 4
    # the SDK's stream helper accumulates the same answer
    with client.responses.stream(model="fake", input="streaming!") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == "streaming!"


def test_a_stream_cut_by_max_output_tokens_ends_incomplete(base_url: str) -> None:
    events = sse_events(base_url, {"model": "fake", "input": "abcdefghi",
                                   "max_output_tokens": 1})
    assert events[-1][0] == "response.incomplete"
    response = events[-1][1]["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


def test_logprobs_when_included(base_url: str) -> None:
    body = {"model": "fake", "input": "abcdef", "include": ["message.output_text.logprobs"],
            "top_logprobs": 2}
    raw = httpx.post(f"{base_url}/v1/responses", json=body).json()
    logprobs = raw["output"][0]["content"][0]["logprobs"]
    assert [lp["token"] for lp in logprobs] == ["abc", "def"]
    assert all(len(lp["top_logprobs"]) == 2 for lp in logprobs)
    deltas = [d for n, d in sse_events(base_url, body) if n == "response.output_text.delta"]
    assert [d["logprobs"][0]["token"] for d in deltas] == ["abc", "def"]


# --------------------------------------------------------------------------- tools


def test_function_call(client: openai.OpenAI, fakes: dict[str, FakeChatModel]) -> None:
    r = client.responses.create(model="tooly", input="weather in Paris?", tools=[WEATHER])
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id and call.id.startswith("fc_")
    assert r.status == "completed" and r.output_text == ""
    (tool,) = fakes["tooly"].requests[-1].tools
    assert (tool.name, tool.parameters) == ("get_weather", WEATHER["parameters"])
    assert r.tools[0].name == "get_weather" and r.tool_choice == "auto"


def test_function_call_streamed(client: openai.OpenAI, base_url: str) -> None:
    events = sse_events(base_url, {"model": "tooly", "input": "weather?", "tools": [WEATHER]})
    names = [n for n, _ in events]
    assert names[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert names[-3:] == ["response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    assert set(names[3:-3]) == {"response.function_call_arguments.delta"}
    added = events[2][1]["item"]
    assert added["type"] == "function_call" and added["status"] == "in_progress"
    assert added["name"] == "get_weather" and added["arguments"] == ""
    arguments = "".join(d["delta"] for n, d in events if n.endswith("arguments.delta"))
    assert arguments == events[-3][1]["arguments"] == CALL.arguments
    done = events[-2][1]["item"]
    assert done["id"] == added["id"] and done["call_id"] == added["call_id"]
    assert done["status"] == "completed"
    with client.responses.stream(model="tooly", input="weather?", tools=[WEATHER]) as stream:
        list(stream)
        (call,) = stream.get_final_response().output
    assert call.type == "function_call" and call.arguments == CALL.arguments


def test_tool_results_come_back_as_items(client: openai.OpenAI,
                                         fakes: dict[str, FakeChatModel]) -> None:
    """An agent loop's second request: the call and its output sent back as items."""
    first = client.responses.create(model="tooly", input="weather?", tools=[WEATHER])
    (call,) = first.output
    client.responses.create(model="fake", input=[
        {"role": "user", "content": "weather?"},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ])
    (_, assistant, tool) = fakes["fake"].requests[-1].messages
    assert assistant.role == "assistant"
    assert assistant.tool_calls == (ToolCall("get_weather", CALL.arguments, call.call_id),)
    assert (tool.role, tool.content, tool.tool_call_id) == ("tool", "sunny", call.call_id)


def test_text_then_calls_are_one_assistant_message(client: openai.OpenAI,
                                                   fakes: dict[str, FakeChatModel]) -> None:
    client.responses.create(model="fake", input=[
        {"role": "user", "content": "two cities"},
        {"role": "assistant", "content": "Checking both."},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "snow"}]},
    ])
    messages = fakes["fake"].requests[-1].messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1].content == "Checking both."
    assert [c.id for c in messages[1].tool_calls] == ["c1", "c2"]
    assert [m.content for m in messages[2:]] == ["rain", "snow"]


def test_tool_choice_maps_onto_the_chat_path(client: openai.OpenAI,
                                             fakes: dict[str, FakeChatModel]) -> None:
    tooly = fakes["tooly"]
    client.responses.create(model="tooly", input="w?", tools=[WEATHER],
                            tool_choice={"type": "function", "name": "get_weather"},
                            parallel_tool_calls=False)
    assert tooly.requests[-1].tool_choice == ToolChoice(mode="function", name="get_weather",
                                                        parallel=False)
    client.responses.create(model="tooly", input="w?", tools=[WEATHER], tool_choice="required")
    assert tooly.requests[-1].tool_choice.mode == "required"
    r = client.responses.create(model="tooly", input="w?", tools=[WEATHER], tool_choice="none")
    assert tooly.requests[-1].tools == () and r.output[0].type == "message"


def test_text_format_is_the_chat_paths_grammar(client: openai.OpenAI,
                                               fakes: dict[str, FakeChatModel]) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = client.responses.create(model="fake", input="x", text={"format": {
        "type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    assert fakes["fake"].requests[-1].grammar == GrammarSpec(
        kind="json_schema", value=json.dumps(schema), strict=True)
    assert r.text is not None and r.text.format is not None
    assert r.text.format.type == "json_schema"
    client.responses.create(model="fake", input="x", text={"format": {"type": "json_object"}})
    assert fakes["fake"].requests[-1].grammar == GrammarSpec(kind="json_object")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"conversation": "conv_1"}, "conversation", "keeps no responses"),
    ({"background": True}, "background", "stored state"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.[0]", "keeps no responses"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.[0]", "'reasoning' is not"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.[0].content.[0]", "'input_image' is not supported"),
    ({"input": []}, "input", "at least 1"),
    ({"tools": [{"type": "web_search"}]}, "tools.[0]", "only 'function' tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice", "not in 'tools'"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text", "tools"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "'schema'"),
    ({"n": 2}, "n", "one answer"),
    ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"temperature": "hot"}, "temperature", "number"),
])
def test_bad_requests_are_400s_naming_the_field(base_url: str, body: dict, param: str,
                                                words: str) -> None:
    r = httpx.post(f"{base_url}/v1/responses", json={"model": "fake", "input": "hi", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error
    # the server keeps serving
    assert httpx.post(f"{base_url}/v1/responses",
                      json={"model": "fake", "input": "ok"}).status_code == 200


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")


# --------------------------------------------------------------------------- real grammars


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=12)
    rank: int = Field(ge=1, le=99)


@pytest.fixture(scope="module")
def demo_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    demo = ensure_demo_checkpoint(tmp_path_factory.mktemp("demo"))
    entries = (ModelEntry(id="demo2", path=demo, dtype="float32", device="cpu"),
               ModelEntry(id="demo3", path=demo, family="chatglm3", dtype="float32",
                          device="cpu"))
    with running_server(create_app(ServerSettings(models=entries)), timeout=120,
                        wait_ready=True) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.mark.parametrize("model", ["demo2", "demo3"])
def test_json_schema_answers_parse(demo_client: openai.OpenAI, model: str) -> None:
    """A random-weight model's answer parses only because the grammar holds it."""
    r = demo_client.responses.parse(model=model, input="a city", text_format=City,
                                    temperature=0.8, max_output_tokens=80)
    assert r.status == "completed", r
    assert isinstance(r.output_parsed, City)
    City.model_validate_json(r.output_text)


@pytest.mark.parametrize("model", ["demo2", "demo3"])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_calls_follow_the_schema(demo_client: openai.OpenAI, model: str,
                                        stream: bool) -> None:
    kw = dict(model=model, input="weather?", tools=[WEATHER], temperature=0.8,
              tool_choice={"type": "function", "name": "get_weather"},
              parallel_tool_calls=False, max_output_tokens=60)
    if stream:
        with demo_client.responses.stream(**kw) as s:  # type: ignore[arg-type]
            names = [e.type for e in s]
            response = s.get_final_response()
        assert "response.function_call_arguments.delta" in names
    else:
        response = demo_client.responses.create(**kw)  # type: ignore[call-overload]
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls)
    for call in calls:
        arguments = json.loads(call.arguments)
        assert set(arguments) == {"city"} and 1 <= len(arguments["city"]) <= 10


def test_stream_equals_non_stream_greedy(demo_client: openai.OpenAI) -> None:
    kw = dict(model="demo2", input="你好", temperature=0.0, max_output_tokens=12)
    whole = demo_client.responses.create(**kw)  # type: ignore[call-overload]
    with demo_client.responses.stream(**kw) as s:  # type: ignore[arg-type]
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response() if whole.status == "completed" else None
    assert "".join(deltas) == whole.output_text
    if final is not None:
        assert final.output_text == whole.output_text
        assert final.usage is not None and whole.usage is not None
        assert final.usage.input_tokens == whole.usage.input_tokens


def test_a_failure_mid_stream_is_an_error_event() -> None:
    failing = FakeChatModel("failing", piece_chars=2, fail_after=1)
    with running_server(create_app(models={"failing": failing})) as url:
        with httpx.stream("POST", f"{url}/v1/responses",
                          json={"model": "failing", "input": "abcdef", "stream": True}) as r:
            text = r.read().decode()
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
            with pytest.raises(openai.APIError), sdk.responses.stream(
                    model="failing", input="abcdef") as stream:
                list(stream)
    last = text.strip().split("\n\n")[-1].split("\n")
    assert last[0] == "event: error"
    assert json.loads(last[1].removeprefix("data: "))["error"]["code"] == "internal_error"
    assert "[DONE]" not in text


def test_counted_in_the_metrics(client: openai.OpenAI, base_url: str) -> None:
    def served() -> float:
        for line in httpx.get(f"{base_url}/metrics").text.splitlines():
            if line.startswith("chatglm_gateway_requests_total{") and \
                    'endpoint="responses"' in line and 'model="fake"' in line and \
                    'status="200"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = served()
    client.responses.create(model="fake", input="count me")
    assert served() == before + 1


def test_the_openapi_document_describes_it() -> None:
    schema = create_app(ServerSettings(), models={}).openapi()
    operation = schema["paths"]["/v1/responses"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ResponsesRequest"}
    assert set(operation["responses"]["200"]["content"]) == {"application/json",
                                                             "text/event-stream"}
    request = schema["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"input", "instructions", "max_output_tokens", "tools", "text"} <= set(request)


def test_an_empty_answer_is_one_empty_message(client: openai.OpenAI, base_url: str) -> None:
    events = sse_events(base_url, {"model": "fake", "input": ""})
    assert [n for n, _ in events] == TEXT_EVENTS + TEXT_END
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == ""
    r = client.responses.create(model="fake", input="")
    assert [item.type for item in r.output] == ["message"] and r.output_text == ""


# --------------------------------------------------------------------------- item order


async def _stream_of(*deltas: Delta) -> list[dict]:
    async def generation() -> AsyncIterator[Delta]:
        for delta in deltas:
            yield delta

    body = ResponsesRequest.model_validate({"model": "m", "input": "x"})
    plan = ResponsePlan(meta=CompletionMeta(id="resp_1", created=1, model="m"), request=body,
                        temperature=1.0, top_p=1.0)
    stream = ChoiceStream([generation()])
    try:
        return [json.loads(e.model_dump_json()) async for e in events(stream, plan)]
    finally:
        await stream.aclose()


def test_text_then_streamed_calls_are_items_one_after_another() -> None:
    out = asyncio.run(_stream_of(
        Delta(text="Let me look."),
        Delta(tool_call_parts=(ToolCallPart(0, name="a"), ToolCallPart(0, arguments='{"x":'))),
        Delta(tool_call_parts=(ToolCallPart(0, arguments=" 1}"), ToolCallPart(1, name="b"),
                               ToolCallPart(1, arguments="{}"))),
        Delta(finish_reason="tool_calls", usage=Usage(3, 9),
              tool_calls=(ToolCall("a", '{"x": 1}'), ToolCall("b", "{}")))))
    steps = [(e["type"].removeprefix("response."), e.get("output_index")) for e in out]
    assert steps == [
        ("created", None), ("in_progress", None),
        ("output_item.added", 0), ("content_part.added", 0), ("output_text.delta", 0),
        ("output_text.done", 0), ("content_part.done", 0), ("output_item.done", 0),
        ("output_item.added", 1), ("function_call_arguments.delta", 1),
        ("function_call_arguments.delta", 1),
        ("function_call_arguments.done", 1), ("output_item.done", 1),
        ("output_item.added", 2), ("function_call_arguments.delta", 2),
        ("function_call_arguments.done", 2), ("output_item.done", 2),
        ("completed", None)]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    final = out[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert [(i.get("name"), i.get("arguments")) for i in final["output"][1:]] == [
        ("a", '{"x": 1}'), ("b", "{}")]
    assert final["output"][0]["content"][0]["text"] == "Let me look."
    assert final["usage"]["input_tokens"] == 3 and final["usage"]["output_tokens"] == 9
    # the done item of each call is the one it opened with
    added = {e["output_index"]: e["item"] for e in out if e["type"].endswith("item.added")}
    done = {e["output_index"]: e["item"] for e in out if e["type"].endswith("item.done")}
    assert all(added[i]["id"] == done[i]["id"] for i in added)
