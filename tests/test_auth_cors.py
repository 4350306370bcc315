"""API keys on every API route (open probes and page), and CORS off until origins are set."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from gateway import auth
from gateway.app import create_app
from gateway.settings import ServerSettings, load_settings
from tests.fake import FakeChatModel
from tests.server import running_server

KEYS = ("sk-first-key-123456", "sk-second-key-abcdef")
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

#: every protected route: (method, path, json body)
PROTECTED = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi"}),
    ("POST", "/", {"prompt": "hi"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/m", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
]
OPEN = [("GET", "/health"), ("GET", "/ready"), ("GET", "/"), ("GET", "/static/app.js")]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = ServerSettings(api_keys=KEYS)
    with TestClient(create_app(settings, models={"m": FakeChatModel("m", reply="ok")}),
                    base_url="http://localhost") as c:
        yield c


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_protected_routes_need_a_key(client: TestClient, method: str, path: str,
                                     body: object) -> None:
    missing = client.request(method, path, json=body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json() == {"error": {
        "message": missing.json()["error"]["message"], "type": "invalid_request_error",
        "param": None, "code": "invalid_api_key"}}
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    wrong = client.request(method, path, json=body,
                           headers={"Authorization": "Bearer sk-wrong-key-000000"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert "sk-wrong-key-000000" not in wrong.text  # a key is never echoed whole
    for key in KEYS:  # every configured key works
        ok = client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("header", ["Basic " + KEYS[0], KEYS[0], "Bearer", "Bearer  ",
                                    "bearer " + KEYS[0][:-1]])
def test_malformed_headers_are_401(client: TestClient, header: str) -> None:
    assert client.get("/v1/models", headers={"Authorization": header}).status_code == 401


def test_scheme_is_case_insensitive(client: TestClient) -> None:
    assert client.get("/v1/models", headers={"Authorization": "bearer " + KEYS[1]}
                      ).status_code == 200


@pytest.mark.parametrize(("method", "path"), OPEN)
def test_open_routes_stay_open(client: TestClient, method: str, path: str) -> None:
    assert client.request(method, path).status_code == 200


def test_unknown_route_is_401_not_404(client: TestClient) -> None:
    # nothing about the server's routes is told to a client without a key
    assert client.get("/v1/nothing").status_code == 401


def test_openai_client_with_and_without_key() -> None:
    app = create_app(ServerSettings(api_keys=KEYS), models={"m": FakeChatModel("m", reply="ok")})
    with running_server(app) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="sk-nope", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as failed:
                bad.chat.completions.create(**CHAT)  # type: ignore[call-overload]
            assert failed.value.code == "invalid_api_key"
        with openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[1], max_retries=0) as good:
            reply = good.chat.completions.create(**CHAT)  # type: ignore[call-overload]
            assert reply.choices[0].message.content == "ok"
            assert [c.choices[0].text for c in good.completions.create(
                model="m", prompt="x", stream=True) if c.choices] == ["o", "k", ""]
        legacy = httpx.post(url, json={"prompt": "hi"},
                            headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert legacy.json()["response"] == "ok"


def test_no_key_configured_is_open() -> None:
    with TestClient(create_app(ServerSettings(), models={"m": FakeChatModel("m")}),
                    base_url="http://localhost") as c:
        assert c.get("/v1/models").status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_key_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nsk-from-file-1\n\n  sk-from-file-2  # ci\n",
                        encoding="utf-8")
    monkeypatch.setenv("CHATGLM_GATEWAY_API_KEYS", "sk-env-1, sk-env-2")
    settings = load_settings(None, api_key_file=key_file)
    assert settings.api_keys == ("sk-env-1", "sk-env-2", "sk-from-file-1", "sk-from-file-2")
    assert "sk-env-1" not in repr(settings)  # keys stay out of logs and reprs
    with TestClient(create_app(settings, models={"m": FakeChatModel("m")}),
                    base_url="http://localhost") as c:
        for key in settings.api_keys:
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}
                         ).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer # team keys"}
                     ).status_code == 401
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no key"):
        ServerSettings(api_key_file=empty)
    with pytest.raises(ValueError, match="cannot read"):
        ServerSettings(api_key_file=tmp_path / "missing.txt")


def test_key_comparison_checks_every_key() -> None:
    keys = [k.encode() for k in KEYS]
    assert auth.key_matches(KEYS[1], keys)
    assert not auth.key_matches(KEYS[1] + "x", keys)
    assert not auth.key_matches("", keys)
    assert auth.key_matches("ключ", ["ключ".encode()])  # non-ASCII keys compare as UTF-8


@pytest.mark.parametrize(("host", "warns"), [("127.0.0.1", False), ("::1", False),
                                             ("localhost", False), ("0.0.0.0", True),
                                             ("192.168.1.5", True)])
def test_open_non_loopback_bind_warns(host: str, warns: bool,
                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        with TestClient(create_app(ServerSettings(host=host), models={}),
                        base_url="http://localhost"):
            pass
    assert any("No API key" in r.getMessage() for r in caplog.records) == warns
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        with TestClient(create_app(ServerSettings(host=host, api_keys=("k",)), models={}),
                        base_url="http://localhost"):
            pass
    assert not any("No API key" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- CORS

ORIGIN = "https://chat.example.com"
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


def test_cors_is_off_by_default() -> None:
    with TestClient(create_app(ServerSettings(), models={"m": FakeChatModel("m")}),
                    base_url="http://localhost") as c:
        preflight = c.options("/v1/chat/completions", headers={"Origin": ORIGIN, **PREFLIGHT})
        assert "access-control-allow-origin" not in preflight.headers
        simple = c.get("/v1/models", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in simple.headers


def test_cors_allows_exactly_the_configured_origins() -> None:
    settings = ServerSettings(cors_origins=(ORIGIN, "http://localhost:3000"), api_keys=KEYS)
    with TestClient(create_app(settings, models={"m": FakeChatModel("m", reply="ok")}),
                    base_url="http://localhost") as c:
        # preflight: allowed without a key (browsers never send one on OPTIONS)
        allowed = c.options("/v1/chat/completions", headers={"Origin": ORIGIN, **PREFLIGHT})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        denied = c.options("/v1/chat/completions",
                           headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert denied.status_code == 400
        assert "access-control-allow-origin" not in denied.headers
        # the actual request carries the header, and so does a 401 (the page can read it)
        ok = c.post("/v1/chat/completions", json=CHAT,
                    headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEYS[0]}"})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        unauthorized = c.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
        assert unauthorized.status_code == 401
        assert unauthorized.headers["access-control-allow-origin"] == ORIGIN
        other = c.get("/v1/models", headers={"Origin": "https://evil.example",
                                             "Authorization": f"Bearer {KEYS[0]}"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_origins_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGLM_GATEWAY_CORS_ORIGINS", "https://a.example,https://b.example")
    assert ServerSettings().cors_origins == ("https://a.example", "https://b.example")
