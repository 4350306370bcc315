"""LangChain's ``ChatOpenAI`` and ``OpenAI`` (langchain-openai, a test dependency) against a
live gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.app import create_app
from gateway.settings import ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

langchain_openai = pytest.importorskip("langchain_openai")

API_KEY = "sk-langchain-test"
REPLY = "你好！I am ChatGLM."


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    models = {"glm": FakeChatModel("glm", reply=REPLY, piece_chars=3),
              "echo": FakeChatModel("echo", transform="reverse")}
    settings = ServerSettings(api_keys=(API_KEY,))
    with running_server(create_app(settings, models=models)) as url:
        yield f"{url}/v1"


def chat_model(base_url: str, **kwargs: object) -> object:
    return langchain_openai.ChatOpenAI(model="glm", base_url=base_url, api_key=API_KEY,
                                       max_retries=0, **kwargs)


def test_chat_invoke(base_url: str) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage

    llm = chat_model(base_url, temperature=0.5)
    message = llm.invoke([SystemMessage("be nice"), HumanMessage("hi")])  # type: ignore[attr-defined]
    assert message.content == REPLY
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.response_metadata["model_name"] == "glm"
    assert message.usage_metadata["output_tokens"] == (len(REPLY) + 2) // 3


def test_chat_stream_with_usage(base_url: str) -> None:
    llm = chat_model(base_url, stream_usage=True)
    chunks = list(llm.stream("hi"))  # type: ignore[attr-defined]
    assert "".join(str(c.content) for c in chunks) == REPLY
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert len(usage) == 1
    assert usage[0]["output_tokens"] == (len(REPLY) + 2) // 3
    assert usage[0]["total_tokens"] == usage[0]["input_tokens"] + usage[0]["output_tokens"]


def test_chat_batch_and_async(base_url: str) -> None:
    llm = langchain_openai.ChatOpenAI(model="echo", base_url=base_url, api_key=API_KEY,
                                      max_retries=0)
    replies = llm.batch(["abc", "xyz", "123"])
    assert [r.content for r in replies] == ["cba", "zyx", "321"]
    reply = asyncio.run(llm.ainvoke("async"))
    assert reply.content == "cnysa"


def test_chat_wrong_key_raises(base_url: str) -> None:
    import openai

    llm = langchain_openai.ChatOpenAI(model="glm", base_url=base_url, api_key="sk-wrong",
                                      max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        llm.invoke("hi")


def test_completions_llm(base_url: str) -> None:
    llm = langchain_openai.OpenAI(model="echo", base_url=base_url, api_key=API_KEY,
                                  max_retries=0, max_tokens=5)
    assert llm.invoke("abcdefgh") == "hgfed"
    # batch sends ONE request with the prompts as a list
    assert llm.batch(["ab", "cd"]) == ["ba", "dc"]
    result = llm.generate(["ab", "cd", "ef"])
    assert [g[0].text for g in result.generations] == ["ba", "dc", "fe"]
    assert result.llm_output is not None
    assert result.llm_output["token_usage"]["completion_tokens"] == 6
    assert "".join(llm.stream("stream")) == "maert"


def test_completions_llm_logprobs(base_url: str) -> None:
    llm = langchain_openai.OpenAI(model="glm", base_url=base_url, api_key=API_KEY,
                                  max_retries=0, max_tokens=2, logprobs=1)
    result = llm.generate(["hi"])
    info = result.generations[0][0].generation_info
    assert info is not None
    assert info["logprobs"]["tokens"] == ["你好！", "I a"]
    assert info["logprobs"]["text_offset"] == [0, 3]
