"""create_app: routes, model resolution, errors raised by prepare, and the loading lifespan."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters.base import InvalidRequest, ModelInfo, ModelUnavailable, Overloaded
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.fake import FakeChatModel

MESSAGES = [{"role": "user", "content": "你好"}]


def client_for(models: dict[str, Any], settings: ServerSettings | None = None) -> TestClient:
    return TestClient(create_app(settings or ServerSettings(), models=models),
                      raise_server_exceptions=False, base_url="http://localhost")


@pytest.fixture()
def client() -> Iterator[TestClient]:
    fake = FakeChatModel("chatglm3-6b", reply="好的", context_length=64)
    settings = ServerSettings(models=(ModelEntry(id="chatglm3-6b", path=Path("unused"),
                                                 aliases=("gpt-3.5-turbo",)),))
    with client_for({"chatglm3-6b": fake}, settings) as c:
        yield c


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_model_list_and_retrieve(client: TestClient) -> None:
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    (card,) = listed["data"]
    assert card["id"] == "chatglm3-6b" and card["object"] == "model"
    assert card["owned_by"] == "chatglm-gateway" and isinstance(card["created"], int)
    assert card["family"] == "fake" and card["context_length"] == 64
    assert card["aliases"] == ["gpt-3.5-turbo"]
    assert client.get("/v1/models/gpt-3.5-turbo").json()["id"] == "chatglm3-6b"
    missing = client.get("/v1/models/org/unknown")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_model_info_extra_is_shown() -> None:
    fake = FakeChatModel("m")
    fake.info = ModelInfo(id="m", family="chatglm2", context_length=32768,
                          extra={"created": 1700000000, "quantization": "int4",
                                 "object": "overridden?", "not_json": object()})
    with client_for({"m": fake}) as c:
        card = c.get("/v1/models/m").json()
    assert card["created"] == 1700000000 and card["quantization"] == "int4"
    assert card["object"] == "model" and "not_json" not in card


def test_chat_completion_and_alias(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "gpt-3.5-turbo", "messages": MESSAGES})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "chatglm3-6b" and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "好的",
                                             "refusal": None}
    assert body["system_fingerprint"].startswith("fp_")


def test_context_length_exceeded_is_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions",
                    json={"model": "chatglm3-6b", "messages": MESSAGES, "max_tokens": 100})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/chat/completions", json={
        "model": "chatglm3-6b", "messages": [{"role": "user", "content": "x" * 100}]})
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("error", "status"),
    [(Overloaded("queue full", retry_after=3), 429), (ModelUnavailable("draining"), 503),
     (InvalidRequest("system messages are rejected", param="messages.[0].role"), 400)],
)
@pytest.mark.parametrize("stream", [False, True])
def test_prepare_errors_come_before_the_stream(error: Exception, status: int,
                                               stream: bool) -> None:
    with client_for({"m": FakeChatModel("m", prepare_error=error)}) as c:  # type: ignore[arg-type]
        r = c.post("/v1/chat/completions",
                   json={"model": "m", "messages": MESSAGES, "stream": stream})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    if status == 429:
        assert r.headers["retry-after"] == "3"


def test_failure_at_the_first_step_is_a_status_not_a_stream() -> None:
    with client_for({"m": FakeChatModel("m", reply="abc", fail_after=0)}) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES,
                                                 "stream": True})
    # fail_after=0 ends with finish_reason "error" on the first Delta: before any byte was sent
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "server_error"


def test_non_stream_model_failure_is_500() -> None:
    with client_for({"m": FakeChatModel("m", reply="abc", fail_after=1)}) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"


def test_seed_plus_index_for_n_choices() -> None:
    fake = FakeChatModel("m", reply="abcdef")
    with client_for({"m": fake}) as c:
        r = c.post("/v1/chat/completions",
                   json={"model": "m", "messages": MESSAGES, "n": 3, "seed": 100})
        assert len(r.json()["choices"]) == 3
        assert [p.seed for p in fake.calls] == [100, 101, 102]
        c.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "n": 2})
        assert [p.seed for p in fake.calls[3:]] == [None, None]


def test_openapi_schema_is_served(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= set(paths)


def test_lifespan_loads_through_the_registry_and_closes(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    loaded: list[FakeChatModel] = []
    calls: list[tuple[Any, ...]] = []

    def load_chat_model(model_id: str, path: Path, **kwargs: Any) -> FakeChatModel:
        calls.append((model_id, path, kwargs))
        model = FakeChatModel(model_id, reply="ok")
        loaded.append(model)
        return model

    registry = types.ModuleType("adapters.registry")
    registry.load_chat_model = load_chat_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "adapters.registry", registry)
    settings = ServerSettings(models=(
        ModelEntry(id="a", path=tmp_path, dtype="bfloat16", device="cpu", quantize="8",
                   system_policy="reject", aliases=("alias-a",), max_running=2),
        ModelEntry(id="b", path=tmp_path),
    ), max_waiting=5)
    with TestClient(create_app(settings), base_url="http://localhost") as c:
        wait_until_ready(c)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["a", "b"]
        r = c.post("/v1/chat/completions", json={"model": "alias-a", "messages": MESSAGES})
        assert r.json()["choices"][0]["message"]["content"] == "ok"
        assert not any(m.closed for m in loaded)
    assert all(m.closed for m in loaded)
    assert calls[0] == ("a", tmp_path, {"family": None, "dtype": "bfloat16", "device": "cpu",
                                        "quantize": "8", "int8_activations": False,
                                        "system_policy": "reject",
                                        "description": "", "max_running": 2,
                                        "max_waiting": 5, "kv_cache_bytes": None,
                                        "prefix_cache": True, "speculative": None})
    assert calls[1][2]["max_running"] == 8 and calls[1][2]["max_waiting"] == 5


def wait_until_ready(c: TestClient, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while c.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.01)


def test_injected_models_are_not_closed_by_the_app() -> None:
    fake = FakeChatModel("m")
    with client_for({"m": fake}) as c:
        assert c.get("/health").status_code == 200
    assert not fake.closed


class _QueueFullOnFirstStep(FakeChatModel):
    """An engine that refuses the request only when it is admitted (first ``__anext__``)."""

    async def generate(self, prompt):  # type: ignore[no-untyped-def, override]
        raise Overloaded("engine queue full", retry_after=1.5)
        yield  # pragma: no cover - makes this an async generator


@pytest.mark.parametrize("stream", [False, True])
def test_first_step_overload_is_429(stream: bool) -> None:
    with client_for({"m": _QueueFullOnFirstStep("m")}) as c:
        r = c.post("/v1/chat/completions",
                   json={"model": "m", "messages": MESSAGES, "stream": stream})
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert c.get("/health").status_code == 200
