"""ChatGLM3 tool calling: OpenAI tools/tool_calls <-> ChatGLM3's own format, and the wire."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from adapters.base import Message, Tool, ToolCall
from adapters.chatglm2.conversation import to_turns
from adapters.chatglm2.postprocess import ChatGLM3Postprocessor
from adapters.chatglm2.tools import TOOLS_PROMPT, call_text, parse_call, tools_system_content
from adapters.conversation import Turn
from gateway.app import create_app
from gateway.settings import ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

WEATHER = Tool("get_weather", "查询天气", {"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]})


def test_tools_system_message_is_chatglm3s_format() -> None:
    text = tools_system_content([WEATHER])
    head, listed = text.split("\n", 1)
    assert head == TOOLS_PROMPT
    assert json.loads(listed) == [{"name": "get_weather", "description": "查询天气",
                                   "parameters": WEATHER.parameters}]
    assert "查询天气" in listed  # ensure_ascii=False, as the reference dumps it
    assert listed == json.dumps(json.loads(listed), indent=4, ensure_ascii=False)


def test_call_round_trip_through_the_model_format() -> None:
    call = ToolCall("get_weather", json.dumps({"city": "北京", "days": 3, "hourly": True,
                                               "tags": ["a", None]}, ensure_ascii=False))
    text = call_text(call)
    assert text == "```python\ntool_call(city='北京', days=3, hourly=True, tags=['a', None])\n```"
    parsed = parse_call("get_weather", text)
    assert parsed is not None and json.loads(parsed.arguments) == json.loads(call.arguments)


@pytest.mark.parametrize("content", [
    "```python\ntool_call(x=__import__('os').system('touch /tmp/pwned'))\n```",
    "```python\nprint('hi')\n```",
    "```python\ntool_call('positional')\n```",
    "```python\ntool_call(**{'a': 1})\n```",
    "```python\ntool_call(a=\n```",
    "no fence at all",
])
def test_anything_but_a_literal_call_is_not_a_tool_call(content: str) -> None:
    assert parse_call("f", content) is None


def test_conversation_with_tools_and_tool_results() -> None:
    conv = to_turns([
        Message("user", "北京天气？"),
        Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "北京"}'),)),
        Message("tool", '{"temperature": 21}'),
    ], tools=[WEATHER])
    assert conv.turns == (
        Turn("system", tools_system_content([WEATHER])),
        Turn("user", "北京天气？"),
        Turn("assistant", "```python\ntool_call(city='北京')\n```", metadata="get_weather"),
    )
    assert (conv.query_role, conv.query) == ("observation", '{"temperature": 21}')


def _stream(post: ChatGLM3Postprocessor, text: str, step: int = 3) -> str:
    out = "".join(post.feed(text[i:i + step]) for i in range(0, len(text), step))
    return out + post.finish()


def test_postprocessor_turns_a_call_into_tool_calls_only_when_tools_were_offered() -> None:
    answer = "get_weather\n```python\ntool_call(city='上海')\n```"
    offered = ChatGLM3Postprocessor(tools=True)
    assert _stream(offered, answer) == ""
    assert offered.tool_calls == (ToolCall("get_weather", '{"city": "上海"}'),)
    plain = ChatGLM3Postprocessor()
    assert _stream(plain, answer) == "```python\ntool_call(city='上海')\n```"
    assert plain.tool_calls == ()
    broken = ChatGLM3Postprocessor(tools=True)
    assert _stream(broken, "get_weather\nnot a call") == "not a call"
    assert broken.tool_calls == ()
    text = ChatGLM3Postprocessor(tools=True)
    assert _stream(text, "\n 你好！ ") == "你好！" and text.tool_calls == ()


@pytest.fixture(scope="module")
def client() -> Iterator[tuple[openai.OpenAI, FakeChatModel]]:
    fake = FakeChatModel("glm3", reply="plain answer",
                         tool_call=ToolCall("get_weather", '{"city": "北京"}'))
    with running_server(create_app(ServerSettings(), models={"glm3": fake})) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), fake


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气",
                                           "parameters": WEATHER.parameters}}]


def test_tool_call_response_in_openai_shape(client) -> None:  # type: ignore[no-untyped-def]
    c, fake = client
    r = c.chat.completions.create(model="glm3", messages=[{"role": "user", "content": "天气"}],
                                  tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "北京"})
    assert fake.tools_seen[-1] == (WEATHER,)


def test_tool_call_streamed(client) -> None:  # type: ignore[no-untyped-def]
    c, _ = client
    chunks = list(c.chat.completions.create(
        model="glm3", messages=[{"role": "user", "content": "天气"}], tools=TOOLS, stream=True))
    calls = [tc for ch in chunks for choice in ch.choices for tc in choice.delta.tool_calls or []]
    # OpenAI's shape: the first piece names the call, the next ones carry its arguments
    assert {tc.index for tc in calls} == {0}
    assert calls[0].id and calls[0].type == "function"
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == ""
    assert all(tc.id is None and tc.function.name is None for tc in calls[1:])
    assert json.loads("".join(tc.function.arguments for tc in calls)) == {"city": "北京"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_offers_nothing(client) -> None:  # type: ignore[no-untyped-def]
    c, fake = client
    r = c.chat.completions.create(model="glm3", messages=[{"role": "user", "content": "天气"}],
                                  tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert fake.tools_seen[-1] == ()
