"""Every error reaches the client in OpenAI's shape with the right status (never FastAPI's 422)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from adapters.base import (
    AdapterError,
    ContextLengthExceeded,
    InvalidRequest,
    ModelUnavailable,
    Overloaded,
)
from gateway import errors
from gateway.errors import install_error_handlers

SHAPE = {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("exc", "status", "error_type", "code"),
    [
        (InvalidRequest("bad", param="messages", code="x"), 400, "invalid_request_error", "x"),
        (ContextLengthExceeded(10, 5, 12), 400, "invalid_request_error",
         "context_length_exceeded"),
        (Overloaded("busy", retry_after=2.5), 429, "rate_limit_error", "rate_limit_exceeded"),
        (ModelUnavailable("loading"), 503, "server_error", "model_unavailable"),
        (AdapterError("secret detail"), 500, "server_error", "internal_error"),
        (RuntimeError("secret detail"), 500, "server_error", "internal_error"),
        (errors.ModelNotFound("nope"), 404, "invalid_request_error", "model_not_found"),
    ],
)
def test_mapping_by_type(exc: Exception, status: int, error_type: str, code: str) -> None:
    error = errors.from_exception(exc)
    body = error.body()["error"]
    assert (error.status_code, body["type"], body["code"]) == (status, error_type, code)
    assert set(body) == SHAPE
    if status == 500:
        assert "secret" not in body["message"]


def test_context_length_names_messages() -> None:
    body = errors.from_exception(ContextLengthExceeded(10, 5, 12)).body()["error"]
    assert body["param"] == "messages"
    assert "12" in body["message"]


def test_overloaded_sends_retry_after_in_whole_seconds() -> None:
    assert errors.from_exception(Overloaded("busy", 2.5)).headers == {"Retry-After": "3"}
    assert errors.from_exception(Overloaded("busy", 0.01)).headers == {"Retry-After": "1"}


def test_unexpected_errors_are_logged_not_shown(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR", logger="gateway.errors"):
        error = errors.from_exception(KeyError("internal-key"))
    assert "internal-key" not in error.message
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


@pytest.fixture()
def client() -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{kind}")
    async def raise_(kind: str) -> None:
        raise {
            "overloaded": Overloaded("queue full", retry_after=4),
            "unavailable": ModelUnavailable("draining"),
            "invalid": InvalidRequest("no", param="messages.[0].role"),
            "bug": ZeroDivisionError("do not leak"),
        }[kind]

    @app.get("/typed/{number}")
    async def typed(number: int) -> dict[str, int]:
        return {"number": number}

    with TestClient(app, raise_server_exceptions=False, base_url="http://localhost") as c:
        yield c


def test_handlers_answer_in_openai_shape(client: TestClient) -> None:
    r = client.get("/raise/overloaded")
    assert r.status_code == 429 and r.headers["retry-after"] == "4"
    assert r.json()["error"]["type"] == "rate_limit_error"
    r = client.get("/raise/unavailable")
    assert r.status_code == 503 and r.json()["error"]["message"] == "draining"
    r = client.get("/raise/invalid")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.[0].role"
    r = client.get("/raise/bug")
    assert r.status_code == 500
    assert set(r.json()["error"]) == SHAPE and "leak" not in r.text


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    r = client.get("/no/such/route")
    assert r.status_code == 404 and set(r.json()["error"]) == SHAPE
    r = client.post("/typed/3")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_path_validation_is_400_not_422(client: TestClient) -> None:
    r = client.get("/typed/abc")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "number"
