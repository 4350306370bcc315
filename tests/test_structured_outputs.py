"""Structured outputs and tool calls that always parse, on every family, through a real uvicorn
server and the official clients (openai SDK, LangChain).

The models have random weights (the demo checkpoint as ChatGLM2 and as ChatGLM3, and THUDM's
tiny reference checkpoints of all three families when ``../shared`` is there): what they say is
noise, so every answer parsing and validating is the grammar's doing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from adapters.demo import ensure_demo_checkpoint
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.conftest import REFERENCE, reference_available
from tests.server import running_server

REFERENCE_MODELS = {
    "ref-chatglm": "chatglm-6b-tiny",
    "ref-chatglm2": "chatglm2-6b-tiny",
    "ref-chatglm3": "chatglm3-6b-tiny-safetensors",
}


def _model_ids() -> list[str]:
    return ["demo2", "demo3"] + (list(REFERENCE_MODELS) if reference_available() else [])


MODELS = _model_ids()
#: families with a chatglm2-style pair prompt (the JSON call convention) and ChatGLM3
PAIR_MODELS = [m for m in MODELS if m in ("demo2", "ref-chatglm", "ref-chatglm2")]
V3_MODELS = [m for m in MODELS if m in ("demo3", "ref-chatglm3")]


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(min_length=1, max_length=12)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=16)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad", "开心"]
    # Bounded strings: a random-weight model almost never picks '"' by itself, so an unbounded
    # string runs to max_tokens (finish "length", as it would with OpenAI).
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)
    address: Address | None


def strict_schema(model: type[BaseModel]) -> dict:
    """The schema as OpenAI's SDK sends it for ``strict`` structured outputs."""
    from openai.lib._pydantic import to_strict_json_schema

    return to_strict_json_schema(model)


def person_format() -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": "person", "schema": strict_schema(Person), "strict": True}}


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(min_length=1, max_length=10)
    days: int = Field(ge=1, le=7)
    unit: Literal["c", "f"] = "c"


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 10},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"enum": ["c", "f"]}},
            "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        # bounded, like every value here: a random model would write digits forever
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -999, "maximum": 999},
            "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    demo = ensure_demo_checkpoint(tmp_path_factory.mktemp("demo"))
    entries = [ModelEntry(id="demo2", path=demo, dtype="float32", device="cpu"),
               ModelEntry(id="demo3", path=demo, family="chatglm3", dtype="float32",
                          device="cpu")]
    if reference_available():
        entries += [ModelEntry(id=mid, path=REFERENCE / "checkpoints" / folder, dtype="float32",
                               device="cpu") for mid, folder in REFERENCE_MODELS.items()]
    with running_server(create_app(ServerSettings(models=tuple(entries))), timeout=120,
                        wait_ready=True) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, model: str, **kw: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "介绍一个人 (describe a person)"}],
        **kw)  # type: ignore[call-overload]


# --------------------------------------------------------------------------- response_format


@pytest.mark.parametrize("model", MODELS)
def test_json_schema_answers_validate_greedy_and_sampled(client: openai.OpenAI,
                                                         model: str) -> None:
    greedy = ask(client, model, response_format=person_format(), temperature=0,
                 max_tokens=200)
    assert greedy.choices[0].finish_reason == "stop"
    Person.model_validate_json(greedy.choices[0].message.content or "")
    sampled = ask(client, model, response_format=person_format(), temperature=1.0, n=3,
                  seed=7, max_tokens=200)
    assert len(sampled.choices) == 3
    for choice in sampled.choices:
        assert choice.finish_reason == "stop"
        Person.model_validate_json(choice.message.content or "")


@pytest.mark.parametrize("model", MODELS)
def test_streamed_equals_non_streamed(client: openai.OpenAI, model: str) -> None:
    whole = ask(client, model, response_format=person_format(), temperature=0, max_tokens=200)
    chunks = list(ask(client, model, response_format=person_format(), temperature=0,
                      max_tokens=200, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", MODELS)
def test_json_object_answers_are_objects(client: openai.OpenAI, model: str) -> None:
    r = ask(client, model, response_format={"type": "json_object"}, temperature=0.8, seed=1,
            n=2, max_tokens=120)
    for choice in r.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content or ""), dict)
        else:  # cut by max_tokens: the object is unfinished, as OpenAI reports it
            assert choice.finish_reason == "length"


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    for model in MODELS:
        completion = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "Who is it?"}],
            response_format=Person, temperature=0, max_tokens=200)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Person), model


def test_a_grammar_cut_by_max_tokens_is_a_length_finish(client: openai.OpenAI) -> None:
    r = ask(client, "demo2", response_format=person_format(), temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="demo2", messages=[{"role": "user", "content": "x"}],
                                      response_format=Person, max_tokens=5)


@pytest.mark.parametrize("model", ["demo2", "demo3"])
def test_vllm_structured_outputs_extension(client: openai.OpenAI, model: str) -> None:
    r = ask(client, model, extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2,4}"}},
            temperature=0.7, seed=3, max_tokens=30)
    assert r.choices[0].finish_reason == "stop"
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", r.choices[0].message.content or "")
    choices = ["positive", "negative", "中立"]
    r = ask(client, model, extra_body={"structured_outputs": {"choice": choices}},
            temperature=1.0, seed=5, n=3, max_tokens=30)
    assert {c.message.content for c in r.choices} <= set(choices)
    lark = 'start: "yes" | "no" | NUMBER\nNUMBER: /[1-9][0-9]{0,2}/'
    r = ask(client, model, extra_body={"structured_outputs": {"grammar": lark}},
            temperature=1.0, seed=2, max_tokens=30)
    content = r.choices[0].message.content or ""
    assert content in ("yes", "no") or (content.isdigit() and 1 <= int(content) <= 999)
    r = ask(client, model, extra_body={"structured_outputs": {"json": WeatherArgs.model_json_schema()}},
            temperature=0, max_tokens=80)
    WeatherArgs.model_validate_json(r.choices[0].message.content or "")


def test_legacy_completions_take_a_response_format(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="demo2", prompt="A person:", max_tokens=200, temperature=0,
        extra_body={"response_format": person_format()})
    Person.model_validate_json(r.choices[0].text)


def test_bad_grammars_are_400s_naming_the_field(base_url: str) -> None:
    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{base_url}/v1/chat/completions", timeout=30, json={
            "model": "demo2", "messages": [{"role": "user", "content": "x"}], **body})

    bad_schema = {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
        "strict": True}}
    for body, param in [
        ({"response_format": bad_schema}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"structured_outputs": {"regex": "("}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ]:
        r = post(body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param, (body, error)
    # the server keeps serving
    assert post({"max_tokens": 2}).status_code == 200


# --------------------------------------------------------------------------- tools


def _call_args(call: object) -> dict:
    function = call.function  # type: ignore[attr-defined]
    return json.loads(function.arguments)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_parse_and_validate(client: openai.OpenAI, model: str,
                                              stream: bool) -> None:
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        kw = dict(model=model, messages=[{"role": "user", "content": "北京天气?"}], tools=TOOLS,
                  tool_choice=choice, temperature=0.9, seed=11, max_tokens=60,
                  parallel_tool_calls=False)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))  # type: ignore[call-overload]
            pieces = [tc for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or []]
            assert pieces and pieces[0].id and pieces[0].function.name
            name = pieces[0].function.name
            arguments = json.loads("".join(p.function.arguments or "" for p in pieces))
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            r = client.chat.completions.create(**kw)  # type: ignore[call-overload]
            assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
            (call,) = r.choices[0].message.tool_calls or []
            name, arguments = call.function.name, _call_args(call)
        if isinstance(choice, dict):
            assert name == "get_weather"
        if name == "get_weather":
            WeatherArgs.model_validate(arguments)
        else:
            assert name == "add" and set(arguments) == {"a", "b"}
            assert all(isinstance(v, int) for v in arguments.values())


@pytest.mark.parametrize("model", PAIR_MODELS)
def test_pair_families_answer_text_or_a_call_with_auto(client: openai.OpenAI,
                                                       model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "1+2?"}], tools=TOOLS,
        temperature=1.0, seed=4, n=4, max_tokens=80)
    for choice in r.choices:
        if choice.finish_reason == "tool_calls":
            for call in choice.message.tool_calls or []:
                assert call.function.name in ("get_weather", "add")
                assert isinstance(_call_args(call), dict)
        else:
            assert choice.finish_reason in ("stop", "length")
            assert not (choice.message.content or "").lstrip().startswith("{")


@pytest.mark.parametrize("model", PAIR_MODELS)
def test_parallel_calls_in_the_pair_convention(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "两个城市的天气"}], tools=TOOLS[:1],
        tool_choice="required", temperature=1.0, seed=9, n=3, max_tokens=200)
    for choice in r.choices:
        assert choice.finish_reason in ("tool_calls", "length")
        for call in choice.message.tool_calls or []:
            WeatherArgs.model_validate(_call_args(call))


# --------------------------------------------------------------------------- LangChain


def test_langchain_structured_output_both_methods(base_url: str) -> None:
    from langchain_openai import ChatOpenAI

    for model in ("demo2", "demo3"):
        llm = ChatOpenAI(model=model, base_url=f"{base_url}/v1", api_key="unused",  # type: ignore[arg-type]
                         temperature=0, max_tokens=200, max_retries=0)
        for method in ("json_schema", "function_calling"):
            result = llm.with_structured_output(Person, method=method).invoke("Describe someone.")
            assert isinstance(result, Person), (model, method)


@pytest.mark.parametrize("model", ["demo2", "demo3"] + [
    m for m in ("ref-chatglm2", "ref-chatglm3") if m in MODELS])
def test_langchain_tool_calling_agent_loop(base_url: str, model: str) -> None:
    """call -> tool message -> answer, as an agent executor runs it."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    class AddArgs(BaseModel):
        # bounded: a random-weight model would write digits forever
        a: int = Field(ge=-999, le=999)
        b: int = Field(ge=-999, le=999)

    @tool(args_schema=AddArgs)
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = ChatOpenAI(model=model, base_url=f"{base_url}/v1", api_key="unused",  # type: ignore[arg-type]
                     temperature=0, max_tokens=120, max_retries=0)
    messages: list = [HumanMessage("What is 2 + 3? Use the add tool.")]
    ai = llm.bind_tools([add], tool_choice="required").invoke(messages)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "add"
    call = ai.tool_calls[0]
    assert set(call["args"]) == {"a", "b"}
    messages += [ai, ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"])]
    answer = llm.bind_tools([add]).invoke(messages)
    assert answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    final = llm.invoke(messages)  # no tools offered: a plain text answer to the result
    assert isinstance(final.content, str)
    assert final.response_metadata["finish_reason"] in ("stop", "length")



@pytest.mark.parametrize("model", PAIR_MODELS)
def test_pair_family_calls_stream_as_they_are_generated(client: openai.OpenAI,
                                                         model: str) -> None:
    kw = dict(model=model, messages=[{"role": "user", "content": "北京天气?"}], tools=TOOLS,
              tool_choice={"type": "function", "function": {"name": "get_weather"}},
              temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    calls = whole.choices[0].message.tool_calls or []
    assert calls
    chunks = list(client.chat.completions.create(stream=True, **kw))  # type: ignore[call-overload]
    pieces = [tc for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or []]
    # one piece per generated token or so, not one block at the end
    assert len([p for p in pieces if p.function.arguments]) > 3
    for i, call in enumerate(calls):
        mine = [p for p in pieces if p.index == i]
        assert mine[0].function.name == "get_weather" and mine[0].id
        assert "".join(p.function.arguments or "" for p in mine) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
