"""POST /tokenize and /detokenize (vLLM's fields) on a real uvicorn server: chat messages count
exactly what a chat completion's ``usage.prompt_tokens`` says, on every family (THUDM's tiny
checkpoints of all three families, with their real tokenizers, when ``../shared`` is there; else
the demo checkpoint as ChatGLM2 and ChatGLM3), and the fake for the wire format and the 400s."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from adapters.demo import ensure_demo_checkpoint
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.conftest import REFERENCE, reference_available
from tests.fake import FakeChatModel
from tests.server import running_server

REFERENCE_MODELS = {
    "ref-chatglm": "chatglm-6b-tiny",
    "ref-chatglm2": "chatglm2-6b-tiny",
    "ref-chatglm3": "chatglm3-6b-tiny-safetensors",
}
#: THUDM's tiny checkpoints (real tokenizers) when there, else the demo as ChatGLM2 and ChatGLM3
MODELS = list(REFERENCE_MODELS) if reference_available() else ["demo2", "demo3"]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

CHATS: dict[str, dict] = {
    "one turn": {"messages": [{"role": "user", "content": "你好，ChatGLM!"}]},
    "system and history": {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "And"},
                                     {"type": "text", "text": "3+3?"}]}]},
    "tools and a result": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "北京天气?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴"}]},
    "tools declined": {"tools": TOOLS, "tool_choice": "none",
                       "messages": [{"role": "user", "content": "hi"}]},
}


@pytest.fixture(scope="module")
def real_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if reference_available():
        entries = [ModelEntry(id=mid, path=REFERENCE / "checkpoints" / folder, dtype="float32",
                              device="cpu") for mid, folder in REFERENCE_MODELS.items()]
    else:
        demo = ensure_demo_checkpoint(tmp_path_factory.mktemp("demo"))
        entries = [ModelEntry(id="demo2", path=demo, dtype="float32", device="cpu"),
                   ModelEntry(id="demo3", path=demo, family="chatglm3", dtype="float32",
                              device="cpu")]
    with running_server(create_app(ServerSettings(models=tuple(entries))), timeout=120,
                        wait_ready=True) as url:
        yield url


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("chat", list(CHATS))
def test_chat_counts_equal_prompt_tokens(real_url: str, model: str, chat: str) -> None:
    body = {"model": model, **CHATS[chat]}
    counted = httpx.post(f"{real_url}/tokenize", json=body)
    assert counted.status_code == 200, counted.text
    data = counted.json()
    assert data["count"] == len(data["tokens"]) > 0
    with openai.OpenAI(base_url=f"{real_url}/v1", api_key="unused", max_retries=0) as client:
        answer = client.chat.completions.create(max_tokens=1, **body)
        assert answer.usage is not None
        assert data["count"] == answer.usage.prompt_tokens
        # a legacy completion's prompt is one user turn in the same format
        if chat == "one turn":
            text = CHATS[chat]["messages"][0]["content"]
            legacy = client.completions.create(model=model, prompt=text, max_tokens=1)
            assert legacy.usage is not None
            prompt = httpx.post(f"{real_url}/tokenize", json={"model": model, "prompt": text})
            assert prompt.json()["tokens"] == data["tokens"]
            assert prompt.json()["count"] == legacy.usage.prompt_tokens


@pytest.mark.parametrize("model", MODELS)
def test_text_round_trip_and_context_length(real_url: str, model: str) -> None:
    text = "Hello world, 你好世界 123"
    r = httpx.post(f"{real_url}/tokenize",
                   json={"model": model, "prompt": text, "add_special_tokens": False}).json()
    info = httpx.get(f"{real_url}/v1/models/{model}").json()
    assert r["max_model_len"] == info["context_length"]
    back = httpx.post(f"{real_url}/detokenize", json={"model": model, "tokens": r["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    # the text alone is fewer ids than the prompt it would be in
    whole = httpx.post(f"{real_url}/tokenize", json={"model": model, "prompt": text}).json()
    assert whole["count"] > r["count"]


@pytest.mark.parametrize("model", MODELS)
def test_out_of_range_ids_are_400s(real_url: str, model: str) -> None:
    r = httpx.post(f"{real_url}/detokenize", json={"model": model, "tokens": [5, 10**7]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tokens.[1]"


# --------------------------------------------------------------------------- wire format


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    fake = FakeChatModel("fake", context_length=64, max_running=0)
    with running_server(create_app(models={"fake": fake})) as url:
        yield url


def test_a_full_model_still_counts_and_long_prompts_are_counted(fake_url: str) -> None:
    """Counting starts nothing: no admission (the fake is always full here) and no
    context-length check (a client asks precisely to learn that a prompt is too long)."""
    text = "x" * 100
    r = httpx.post(f"{fake_url}/tokenize",
                   json={"messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200
    assert r.json() == {"count": len("user: " + text), "max_model_len": 64,
                        "tokens": [ord(c) for c in "user: " + text]}
    assert httpx.post(f"{fake_url}/v1/chat/completions", json={
        "model": "fake", "messages": [{"role": "user", "content": "x"}]}).status_code == 429


def test_detokenize_wire_format(fake_url: str) -> None:
    r = httpx.post(f"{fake_url}/detokenize", json={"model": "fake", "tokens": [104, 105]})
    assert r.json() == {"prompt": "hi"}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": False}, "add_generation_prompt"),
    ("/tokenize", {"prompt": "a", "continue_final_message": True}, "continue_final_message"),
    ("/tokenize", {"prompt": "a", "return_token_strs": True}, "return_token_strs"),
    ("/tokenize", {"prompt": "a", "chat_template": "{{x}}"}, "chat_template"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/detokenize", {"tokens": ["a"]}, "tokens.[0]"),
    ("/detokenize", {"tokens": [-1]}, "tokens.[0]"),
    ("/detokenize", {}, "tokens"),
])
def test_bad_requests_are_400s(fake_url: str, path: str, body: dict, param: str) -> None:
    r = httpx.post(f"{fake_url}{path}", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_a_404(fake_url: str) -> None:
    r = httpx.post(f"{fake_url}/tokenize", json={"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_the_openapi_document_describes_them() -> None:
    schema = create_app(ServerSettings(), models={}).openapi()
    for path, request, response in (("/tokenize", "TokenizeRequest", "TokenizeResponse"),
                                    ("/detokenize", "DetokenizeRequest", "DetokenizeResponse")):
        operation = schema["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{request}"}
        assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{response}"}
