"""The OpenAI Agents SDK (openai-agents, a test dependency) runs its agent loop on the gateway's
Responses API: the model calls a function tool, the SDK runs it and sends the result back as
``function_call_output``, the model answers; non-streamed and streamed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Annotated

import pytest
from pydantic import Field

from adapters.base import ToolCall
from adapters.demo import ensure_demo_checkpoint
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

agents = pytest.importorskip("agents")
agents.set_tracing_disabled(True)  # traces would be sent to OpenAI


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeChatModel]]:
    # The fake calls the tool when offered it, and answers a tool result by echoing it.
    fake = FakeChatModel("glm", tool_call=ToolCall("get_weather", '{"city": "Paris"}'))
    with running_server(create_app(models={"glm": fake})) as url:
        yield url, fake


def _run(url: str, streamed: bool, model: str = "glm",
         **agent_options: object) -> tuple[object, list[str]]:
    from openai import AsyncOpenAI

    cities: list[str] = []

    # bounded: a random-weight model would rarely close an unbounded string
    @agents.function_tool
    def get_weather(city: Annotated[str, Field(min_length=1, max_length=10)]) -> str:
        """The weather of a city."""
        cities.append(city)
        return f"sunny in {city}"

    async def main() -> object:
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            agent = agents.Agent(
                name="weather", instructions="Answer with the weather.", tools=[get_weather],
                model=agents.OpenAIResponsesModel(model=model, openai_client=client),
                **agent_options)  # type: ignore[arg-type]
            if not streamed:
                return (await agents.Runner.run(agent, "Weather in Paris?")).final_output
            run = agents.Runner.run_streamed(agent, "Weather in Paris?")
            async for _ in run.stream_events():
                pass
            return run.final_output

    return asyncio.run(main()), cities


@pytest.mark.parametrize("streamed", [False, True])
def test_agent_loop_with_a_function_tool(served: tuple[str, FakeChatModel],
                                         streamed: bool) -> None:
    url, fake = served
    before = len(fake.requests)
    final, cities = _run(url, streamed)
    assert cities == ["Paris"]  # the SDK ran the tool the model called
    assert final == "sunny in Paris"  # and the model saw the tool's result
    first, second = fake.requests[before:]
    assert [m.role for m in first.messages] == ["system", "user"]
    assert [t.name for t in first.tools] == ["get_weather"]
    assert [m.role for m in second.messages] == ["system", "user", "assistant", "tool"]
    call_id = second.messages[2].tool_calls[0].id
    assert call_id and second.messages[3].tool_call_id == call_id


def test_a_forced_call_of_the_demo_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The random-weight demo model, its call forced (``tool_choice`` in the model settings):
    the SDK parses the call the grammar held to the tool's schema and runs the tool."""
    demo = ensure_demo_checkpoint(tmp_path_factory.mktemp("demo"))
    settings = ServerSettings(models=(ModelEntry(id="demo", path=demo, dtype="float32",
                                                 device="cpu", defaults={"max_tokens": 60}),))  # type: ignore[arg-type]
    with running_server(create_app(settings), timeout=120, wait_ready=True) as url:
        final, cities = _run(url, False, model="demo", tool_use_behavior="stop_on_first_tool",
                             model_settings=agents.ModelSettings(
                                 tool_choice="get_weather", parallel_tool_calls=False,
                                 temperature=0.7, extra_body={"seed": 3}))
    assert len(cities) == 1 and 1 <= len(cities[0]) <= 10
    assert final == f"sunny in {cities[0]}"
