"""End to end: a client's name for its conversation (``X-Session-Id``, ``prompt_cache_key``,
``user``) reaches the model side as the prompt's routing key (``Prompt.affinity``), over a real
uvicorn server with the official client; a bad header is ignored, the request served."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def fake() -> FakeChatModel:
    return FakeChatModel("fake", reply="hello")


@pytest.fixture(scope="module")
def base_url(fake: FakeChatModel) -> Iterator[str]:
    settings = ServerSettings(models=(ModelEntry(id="fake", path="unused"),))
    with running_server(create_app(settings, models={"fake": fake})) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _key(client: openai.OpenAI, fake: FakeChatModel, session: str | None = None,
         **fields: Any) -> str:
    """The routing key the model got for a chat completion with these names."""
    headers = {"X-Session-Id": session} if session is not None else None
    completion = client.chat.completions.create(model="fake", messages=MESSAGES,
                                                extra_headers=headers, **fields)
    assert completion.choices[0].message.content == "hello"
    return fake.prompts[-1].affinity


def test_the_header_names_the_conversation_before_any_field(
        client: openai.OpenAI, fake: FakeChatModel) -> None:
    session = _key(client, fake, "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b")
    assert session and "3f2a9c1e" not in session  # a digest, not the client's name
    assert _key(client, fake, "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b", user="alice",
                prompt_cache_key="chat-7") == session
    assert _key(client, fake, "another-session", user="alice") not in ("", session)


def test_prompt_cache_key_comes_before_user_and_no_name_is_no_key(
        client: openai.OpenAI, fake: FakeChatModel) -> None:
    alice = _key(client, fake, user="alice")
    cached = _key(client, fake, prompt_cache_key="chat-7")
    assert "" not in (alice, cached) and alice != cached
    assert _key(client, fake, user="alice", prompt_cache_key="chat-7") == cached
    assert _key(client, fake, user="alice") == alice  # the same name, the same key
    # the same name routes together whichever way it is sent
    assert _key(client, fake, "alice") == alice
    assert _key(client, fake) == ""
    assert _key(client, fake, user="") == ""


@pytest.mark.parametrize("value", [
    b"x" * 129,            # too long
    b"two words",          # a space
    b"caf\xc3\xa9",        # not ASCII
    b"tab\there",
    b"",
], ids=["long", "space", "non-ascii", "tab", "empty"])
def test_a_bad_header_is_ignored_and_the_request_served(
        base_url: str, fake: FakeChatModel, client: openai.OpenAI, value: bytes) -> None:
    alice = _key(client, fake, user="alice")
    answer = httpx.post(f"{base_url}/v1/chat/completions", timeout=10,
                        headers=[(b"X-Session-Id", value)],
                        json={"model": "fake", "messages": MESSAGES, "user": "alice"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "hello"
    assert fake.prompts[-1].affinity == alice  # as if the header had not been sent
    # the longest valid one counts
    assert _key(client, fake, "x" * 128, user="alice") not in ("", alice)


def test_every_generating_route_carries_the_key(
        base_url: str, client: openai.OpenAI, fake: FakeChatModel) -> None:
    session = _key(client, fake, "s-42")
    # legacy completions: every prompt and every choice of it
    before = len(fake.prompts)
    completion = client.completions.create(model="fake", prompt=["a", "b"], n=2,
                                           extra_headers={"X-Session-Id": "s-42"})
    assert len(completion.choices) == 4
    assert [p.affinity for p in fake.prompts[before:]] == [session] * 4
    client.completions.create(model="fake", prompt="a", user="s-42")
    assert fake.prompts[-1].affinity == session
    # a streamed chat completion
    with client.chat.completions.create(model="fake", messages=MESSAGES, stream=True,
                                        extra_headers={"X-Session-Id": "s-42"}) as stream:
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hello"
    assert fake.prompts[-1].affinity == session
    # the Responses API, by its prompt_cache_key
    response = client.responses.create(model="fake", input="hi", prompt_cache_key="s-42")
    assert response.output_text == "hello"
    assert fake.prompts[-1].affinity == session
    # ChatGLM's own POST / has no such field: the header
    answer = httpx.post(f"{base_url}/", headers={"X-Session-Id": "s-42"}, timeout=10,
                        json={"model": "fake", "prompt": "hi", "history": []})
    assert answer.status_code == 200 and answer.json()["response"] == "hello"
    assert fake.prompts[-1].affinity == session


def test_a_prompt_cache_key_that_is_not_a_string_is_a_400(
        base_url: str, client: openai.OpenAI, fake: FakeChatModel) -> None:
    answer = httpx.post(f"{base_url}/v1/chat/completions", timeout=10, json={
        "model": "fake", "messages": MESSAGES, "prompt_cache_key": 7})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "prompt_cache_key"
    assert _key(client, fake, prompt_cache_key="7") != ""  # and the server keeps serving
