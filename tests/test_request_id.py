"""``X-Request-Id`` on every response of a real uvicorn server, and in the access and error log
lines of that request: an operator greps the id a user reports."""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from adapters.base import AdapterError
from gateway.app import create_app
from gateway.request_ids import RequestIdFilter, install_log_filter
from gateway.settings import ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

GENERATED = re.compile(r"req-[0-9a-f]{32}")
KEY = "sk-test"
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    models = {"fake": FakeChatModel("fake"),
              "broken": FakeChatModel("broken", prepare_error=AdapterError("engine fault")),
              "crashing": FakeChatModel("crashing", prepare_error=RuntimeError("bug")),  # type: ignore[arg-type]
              "failing": FakeChatModel("failing", fail_after=1)}
    settings = ServerSettings(api_keys=(KEY,), cors_origins=(ORIGIN,), max_request_bytes=4096)
    with running_server(create_app(settings, models=models)) as base:
        yield base


@pytest.fixture
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def _access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    """The access line of ``request_id``: the middleware writes it once the response is sent,
    so it may land a moment after the client has read the response."""
    deadline = time.monotonic() + 5
    while True:
        lines = [x.getMessage() for x in caplog.records if x.name == "gateway.access"
                 and x.getMessage().startswith(request_id + " ")]
        if lines or time.monotonic() > deadline:
            (line,) = lines
            return line
        time.sleep(0.01)


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def _every_kind_of_answer(client: httpx.Client) -> list[httpx.Response]:
    return [
        client.get("/health"),
        client.get("/v1/models"),
        client.post("/v1/chat/completions", json=CHAT),
        client.post("/v1/chat/completions", json={**CHAT, "stream": True}),
        client.post("/v1/responses", json={"model": "fake", "input": "hi", "stream": True}),
        client.post("/tokenize", json={"prompt": "hi"}),
        client.post("/v1/chat/completions", json={"model": "fake"}),  # 400
        client.get("/nowhere"),  # 404
        client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer x"}),
        client.post("/v1/chat/completions", content=b"x" * 5000),  # 413 at the guard
        client.options("/v1/chat/completions", headers={  # CORS preflight
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"}),
    ]


def test_every_response_has_a_new_id(client: httpx.Client) -> None:
    answers = _every_kind_of_answer(client)
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 200, 400, 404, 401,
                                                413, 200]
    ids = [r.headers["x-request-id"] for r in answers]
    assert all(GENERATED.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_the_clients_id_is_echoed(client: httpx.Client) -> None:
    for given in ("my-trace.42", "0af7651916cd43dd8448eb211c80319c", "Root=1-5759e988",
                  "a" * 128):
        answers = [client.post("/v1/chat/completions", json=CHAT,
                               headers={"X-Request-Id": given}),
                   client.get("/nowhere", headers={"X-Request-Id": given})]
        assert [r.headers["x-request-id"] for r in answers] == [given, given]


@pytest.mark.parametrize("given", ["", "has space", 'quo"te', "a" * 129, "50%", "ü",
                                   "x\tinjected 200 OK"])
def test_unsafe_ids_are_replaced(client: httpx.Client, given: str) -> None:
    r = client.get("/health", headers={"X-Request-Id": given.encode()})
    assert GENERATED.fullmatch(r.headers["x-request-id"])


def test_browsers_may_read_it(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_access_lines_name_the_request(client: httpx.Client,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    ok = client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                     headers={"X-Request-Id": "trace-ok"})
    bad = client.post("/v1/chat/completions", json={"model": "fake"})
    refused = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    for response, method, path in ((ok, "POST", "/v1/chat/completions"),
                                   (bad, "POST", "/v1/chat/completions"),
                                   (refused, "GET", "/v1/models")):
        line = _access_line(caplog, response.headers["x-request-id"])
        assert f'"{method} {path} HTTP/1.1" {response.status_code} ' in line, line


def test_paths_cannot_forge_log_lines(client: httpx.Client,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    r = client.get("/a%0Ab%20c")
    line = _access_line(caplog, r.headers["x-request-id"])
    assert "\n" not in line and "/a%0Ab%20c" in line


@pytest.mark.parametrize(("model", "logged"), [("broken", "model error: engine fault"),
                                              ("crashing", "unhandled error")])
def test_error_lines_name_the_request(client: httpx.Client, caplog: pytest.LogCaptureFixture,
                                      model: str, logged: str) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO)
    r = client.post("/v1/chat/completions", json={**CHAT, "model": model},
                    headers={"X-Request-Id": f"user-report-{model}"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers["x-request-id"] == f"user-report-{model}"
    errors = [x for x in caplog.records if x.levelno >= logging.ERROR
              and x.getMessage().startswith(f"[user-report-{model}] ")]
    assert any(logged in x.getMessage() for x in errors), caplog.text
    assert '" 500 ' in _access_line(caplog, f"user-report-{model}")


def test_a_stream_failing_midway_names_the_request(client: httpx.Client,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO)
    r = client.post("/v1/responses", json={"model": "failing", "input": "abc", "stream": True},
                    headers={"X-Request-Id": "user-stream"})
    assert r.status_code == 200 and "event: error" in r.text
    assert any(x.getMessage().startswith("[user-stream] stream resp_")
               and "ended with an error" in x.getMessage() for x in caplog.records), caplog.text


def test_lines_outside_requests_are_left_alone() -> None:
    logger = logging.getLogger("tests.request_ids")
    stream = io.StringIO()
    logger.addHandler(logging.StreamHandler(stream))
    try:
        install_log_filter(logger)
        install_log_filter(logger)  # once per handler
        logger.warning("plain %s", "line")
    finally:
        logger.handlers.clear()
    assert stream.getvalue() == "plain line\n"
