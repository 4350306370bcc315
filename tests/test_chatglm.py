"""ChatGLM's original API (``POST /``) field by field against THUDM's ``api.py`` format."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters.base import ChatRequest, Message
from gateway.app import create_app
from gateway.settings import ModelEntry, SamplingDefaults, ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server


@pytest.fixture(scope="module")
def models() -> dict[str, FakeChatModel]:
    # "first" is configured first: POST / without "model" serves it
    return {"first": FakeChatModel("first", reply="我是 ChatGLM"),
            "second": FakeChatModel("second", transform="reverse")}


@pytest.fixture(scope="module")
def base_url(models: dict[str, FakeChatModel]) -> Iterator[str]:
    settings = ServerSettings(models=(ModelEntry(id="first", path=Path("unused")),
                                      ModelEntry(id="second", path=Path("unused"),
                                                 aliases=("glm",),
                                                 defaults=SamplingDefaults(temperature=0.3,
                                                                           max_tokens=7))))
    with running_server(create_app(settings, models=models)) as url:
        yield url


def test_answer_has_exactly_api_py_fields(base_url: str, models: dict[str, FakeChatModel]) -> None:
    before = datetime.datetime.now().replace(microsecond=0)
    r = httpx.post(f"{base_url}/", json={"prompt": "你好", "history": []})
    after = datetime.datetime.now()
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["response", "history", "status", "time"]
    assert body["response"] == "我是 ChatGLM"
    assert body["history"] == [["你好", "我是 ChatGLM"]]
    assert body["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert before <= datetime.datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S") <= after
    assert list(models["first"].requests[-1].messages) == [Message("user", "你好")]


def test_history_pairs_become_turns_and_grow(base_url: str,
                                             models: dict[str, FakeChatModel]) -> None:
    history = [["q1", "a1"], ["q2", "a2"]]
    body = httpx.post(f"{base_url}/", json={"prompt": "q3", "history": history}).json()
    assert body["history"] == [["q1", "a1"], ["q2", "a2"], ["q3", "我是 ChatGLM"]]
    assert list(models["first"].requests[-1].messages) == [
        Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2"),
        Message("assistant", "a2"), Message("user", "q3")]
    # the client sends the returned history back, as api.py clients do
    again = httpx.post(f"{base_url}/", json={"prompt": "q4", "history": body["history"]}).json()
    assert len(again["history"]) == 4


def test_missing_and_null_history(base_url: str) -> None:
    assert httpx.post(f"{base_url}/", json={"prompt": "x"}).json()["history"] == [
        ["x", "我是 ChatGLM"]]
    assert httpx.post(f"{base_url}/", json={"prompt": "x", "history": None}).json()[
        "history"] == [["x", "我是 ChatGLM"]]


def test_chatglm3_message_history(base_url: str, models: dict[str, FakeChatModel]) -> None:
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
               {"role": "assistant", "content": "a1"}]
    body = httpx.post(f"{base_url}/", json={"prompt": "q2", "history": history}).json()
    assert body["history"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "metadata": "", "content": "我是 ChatGLM"}]
    assert models["first"].requests[-1].messages[0] == Message("system", "be brief")


def test_defaults_as_api_py(base_url: str, models: dict[str, FakeChatModel]) -> None:
    first = models["first"]
    httpx.post(f"{base_url}/", json={"prompt": "hello"})
    params = first.calls[-1]
    assert (params.temperature, params.top_p) == (0.95, 0.7)
    # max_length 2048 is the TOTAL length: the prompt's tokens are taken from it
    assert params.max_tokens == 2048 - len("user: hello")
    # api.py: "x if x else default" -- 0 means the default too
    httpx.post(f"{base_url}/", json={"prompt": "hello", "temperature": 0, "top_p": 0,
                                     "max_length": 0})
    assert (first.calls[-1].temperature, first.calls[-1].top_p) == (0.95, 0.7)
    httpx.post(f"{base_url}/", json={"prompt": "hello", "temperature": 0.5, "top_p": 0.9,
                                     "max_length": 100})
    assert (first.calls[-1].temperature, first.calls[-1].top_p, first.calls[-1].max_tokens) == (
        0.5, 0.9, 100 - len("user: hello"))


def test_model_defaults_apply_before_api_py_defaults(
        base_url: str, models: dict[str, FakeChatModel]) -> None:
    second = models["second"]
    httpx.post(f"{base_url}/", json={"prompt": "hello", "model": "second"})
    # the model's configured temperature and max_tokens; api.py's top_p where none is configured
    assert (second.calls[-1].temperature, second.calls[-1].top_p) == (0.3, 0.7)
    assert second.calls[-1].max_tokens == 7
    # a value in the request still wins; max_length still caps the answer below the default
    httpx.post(f"{base_url}/", json={"prompt": "hello", "model": "second", "temperature": 0.9,
                                     "max_length": len("user: hello") + 2})
    assert (second.calls[-1].temperature, second.calls[-1].max_tokens) == (0.9, 2)


def test_max_length_counts_the_prompt(base_url: str) -> None:
    long_prompt = "p" * 40
    r = httpx.post(f"{base_url}/", json={"prompt": long_prompt, "max_length": 46,
                                         "model": "second"})
    # 46 - len("user: " + 40 chars) = 0 tokens left: a 400 naming max_length
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_length"
    r = httpx.post(f"{base_url}/", json={"prompt": "abcdef", "max_length": len("user: abcdef") + 3,
                                         "model": "second"})
    assert r.json()["response"] == "fed"  # 3 tokens of the reversed prompt


def test_model_extension_and_alias(base_url: str) -> None:
    assert httpx.post(f"{base_url}/", json={"prompt": "abc", "model": "glm"}).json()[
        "response"] == "cba"
    missing = httpx.post(f"{base_url}/", json={"prompt": "abc", "model": "nope"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body", [
    {}, {"prompt": 3}, {"prompt": "x", "history": [["only one"]]},
    {"prompt": "x", "history": [{"role": "wizard", "content": "x"}]},
    {"prompt": "x", "top_p": 1.5}, {"prompt": "x", "temperature": "hot"},
])
def test_bad_bodies_are_400_in_openai_shape(base_url: str, body: dict[str, object]) -> None:
    r = httpx.post(f"{base_url}/", json=body)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_get_root_is_not_the_chatglm_api(base_url: str) -> None:
    # GET / belongs to the web page; ChatGLM's API only answers POST
    r = httpx.get(f"{base_url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


def test_api_py_client_against_the_demo_checkpoint(tmp_path: Path) -> None:
    """A THUDM api.py-style client (requests.post(url, json=...)) on a real ChatGLM2 model."""
    from adapters.demo import ensure_demo_checkpoint
    from adapters.registry import load_chat_model

    model = load_chat_model("demo", ensure_demo_checkpoint(tmp_path), device="cpu",
                            dtype="float32")
    try:
        with running_server(create_app(ServerSettings(), models={"demo": model})) as url:
            first = httpx.post(url, json={"prompt": "你好", "history": [], "max_length": 40,
                                          "temperature": 0.01}, timeout=30).json()
            metrics = httpx.get(f"{url}/metrics").text
            generated_first = float(re.search(
                r'^chatglm_gateway_generated_tokens_total\{model="demo"\} (\S+)$', metrics,
                re.M).group(1))  # type: ignore[union-attr]
            second = httpx.post(url, json={"prompt": "再见", "history": first["history"],
                                           "max_length": 80}, timeout=30).json()
        assert first["status"] == second["status"] == 200
        assert first["history"] == [["你好", first["response"]]]
        assert second["history"][0] == ["你好", first["response"]]
        assert second["history"][1] == ["再见", second["response"]]
        # max_length is the total: at most what was left after the prompt was generated
        prompt_ids = model.prepare(ChatRequest((Message("user", "你好"),))).token_ids
        assert 0 < generated_first <= 40 - len(prompt_ids)
    finally:
        model.close()
