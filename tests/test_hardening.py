"""Inputs a hostile-but-realistic client sends: out-of-range numbers, fan-outs, bursts, odd
methods.  Every answer is an OpenAI-shaped 4xx (never a 5xx) and the server keeps serving.
Real parts: the demo checkpoint on a real uvicorn server, limits ``--max-running 2
--max-waiting 2``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from adapters.demo import ensure_demo_checkpoint
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.server import running_server

EOS = 2  # ChatGLM2's </s>


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = ensure_demo_checkpoint(tmp_path_factory.mktemp("demo"))
    settings = ServerSettings(max_running=2, max_waiting=2, models=(
        ModelEntry(id="demo", path=folder, dtype="float32", device="cpu"),))
    with running_server(create_app(settings), timeout=60, wait_ready=True) as url:
        yield url


def chat(base_url: str, **body: object) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
        "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        **body})


@pytest.mark.parametrize(("body", "param"), [
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**63 - 1, "n": 2}, "seed"),
    ({"seed": -1}, "seed"),
    ({"logit_bias": {"1" * 4301: 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"n": 17}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**30}, "messages"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"stop": ["a"] * 5}, "stop"),
])
def test_out_of_range_values_are_400s_naming_the_field(base_url: str, body: dict,
                                                        param: str) -> None:
    r = chat(base_url, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_the_largest_valid_seed_works(base_url: str) -> None:
    r = chat(base_url, seed=2**63 - 2, n=2, temperature=1.0)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


def test_a_fan_out_that_could_never_fit_is_refused_at_once(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
        "model": "demo", "prompt": ["x"] * 3, "n": 2, "max_tokens": 4})
    assert r.status_code == 400
    assert "6 generations" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
        "model": "demo", "prompt": ["x"] * 65, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_burst_gets_exactly_the_capacity(base_url: str) -> None:
    """20 streams at once against 2 running + 2 waiting: 4 are admitted (and kept open, so
    nothing frees up), 16 get 429 with Retry-After; the waiting gauge never passes 2."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            async def one() -> tuple[int, httpx.Response]:
                request = client.build_request("POST", f"{base_url}/v1/chat/completions", json={
                    "model": "demo", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2000, "stream": True, "logit_bias": {str(EOS): -100}})
                response = await client.send(request, stream=True)
                return response.status_code, response

            results = await asyncio.gather(*(one() for _ in range(20)))
            metrics = (await client.get(f"{base_url}/metrics")).text
            for status, response in results:
                if status == 429:
                    assert float(response.headers["retry-after"]) > 0
                await response.aclose()
            waiting = [line for line in metrics.splitlines()
                       if line.startswith("chatglm_gateway_requests_waiting{")]
            assert waiting and all(float(line.split()[-1]) <= 2 for line in waiting)
            return [status for status, _ in results]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 4 and statuses.count(429) == 16
    # the streams closed: the server serves again
    for _ in range(100):
        if chat(base_url).status_code == 200:
            break
        asyncio.run(asyncio.sleep(0.05))
    else:
        pytest.fail("the server did not recover after the burst")


def test_logprobs_of_an_empty_answer_are_an_empty_list(base_url: str) -> None:
    r = chat(base_url, logprobs=True, logit_bias={str(EOS): 100})
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == ""
    assert choice["logprobs"] == {"content": [], "refusal": None}
    r = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
        "model": "demo", "prompt": "hi", "max_tokens": 4, "logprobs": 1,
        "logit_bias": {str(EOS): 100}})
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [] and logprobs["token_logprobs"] == []


@pytest.mark.parametrize("path", ["/", "/health", "/ready", "/v1/models", "/v1/models/demo",
                                  "/metrics", "/static/app.js"])
def test_head_answers_every_get_route(base_url: str, path: str) -> None:
    get, head = httpx.get(base_url + path), httpx.head(base_url + path)
    assert get.status_code == head.status_code == 200
    assert head.content == b""


def test_405_lists_every_method_of_the_path(base_url: str) -> None:
    r = httpx.request("OPTIONS", f"{base_url}/")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD, POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.delete(f"{base_url}/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_bodies_over_the_limit_are_413(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.fake import FakeChatModel

    app = create_app(ServerSettings(max_request_bytes=4096),
                     models={"m": FakeChatModel("m", reply="ok")})
    with running_server(app) as url:
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        r = httpx.post(f"{url}/v1/chat/completions", content=chunks(),
                       headers={"content-type": "application/json"})
        assert r.status_code == 413
        small = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=small).status_code == 200


def test_too_many_headers_are_431(base_url: str) -> None:
    headers = {f"x-h{i}": "v" for i in range(120)}
    r = httpx.get(f"{base_url}/v1/models", headers=headers)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"


def test_a_prompt_longer_than_any_context_is_refused_before_tokenizing(base_url: str) -> None:
    r = chat(base_url, messages=[{"role": "user", "content": "长" * 1_000_000}])
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200


def test_foreign_origins_and_hosts_are_refused(base_url: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    # a page on another site posting "simple" text/plain: refused before anything runs
    r = httpx.post(url, content=__import__("json").dumps(body),
                   headers={"origin": "https://evil.example", "content-type": "text/plain"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert httpx.post(url, json=body, headers={"origin": base_url}).status_code == 200
    assert httpx.get(f"{base_url}/v1/models",
                     headers={"origin": "https://evil.example"}).status_code == 200
    # DNS rebinding: a foreign name pointing at 127.0.0.1
    r = httpx.get(f"{base_url}/v1/models", headers={"host": "evil.example:8000"})
    assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{base_url}/v1/models", headers={"host": "localhost:1"}).status_code == 200


def test_allowed_origins_and_hosts_pass() -> None:
    from tests.fake import FakeChatModel

    settings = ServerSettings(cors_origins=("https://app.example",),
                              allowed_hosts=("gateway.internal",))
    with running_server(create_app(settings, models={"m": FakeChatModel("m", reply="ok")})) as url:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body,
                       headers={"origin": "https://app.example"})
        assert r.status_code == 200
        r = httpx.get(f"{url}/v1/models", headers={"host": "gateway.internal:8000"})
        assert r.status_code == 200


def test_a_client_leaving_during_its_upload_is_a_499(base_url: str) -> None:
    import socket

    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"mo")
    for _ in range(100):
        metrics = httpx.get(f"{base_url}/metrics").text
        if 'status="499"' in metrics:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert 'status="499"' in metrics
    assert 'status="500"' not in metrics


WRONG_TYPES = {
    "model": 123, "messages": "hi", "frequency_penalty": "a", "logit_bias": [1],
    "logprobs": "yes", "max_completion_tokens": 1.5, "max_tokens": "10", "n": 1.0,
    "presence_penalty": "0", "seed": "1", "stop": 5, "stream": "true", "stream_options": 5,
    "temperature": "hot", "tool_choice": 5, "tools": "x", "top_logprobs": "2", "top_p": [],
    "user": 5, "top_k": "1", "repetition_penalty": "x", "response_format": "json",
    "structured_outputs": 5, "parallel_tool_calls": "yes",
}


@pytest.mark.parametrize("field", sorted(WRONG_TYPES))
def test_a_wrong_type_in_any_field_is_a_400_naming_it(base_url: str, field: str) -> None:
    r = chat(base_url, **{field: WRONG_TYPES[field]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].split(".")[0] == field


def test_usage_reports_the_prompt_tokens_served_from_the_prefix_cache(base_url: str) -> None:
    """OpenAI's usage.prompt_tokens_details.cached_tokens: on the next turn, the reused history
    (streamed usage chunk too).  A first turn may reuse only the chat template's first tokens
    from earlier requests."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    history = [{"role": "user", "content": "讲一个很长的故事 about a dragon " * 4}]
    first = client.chat.completions.create(model="demo", messages=history, max_tokens=8,
                                           temperature=0)  # type: ignore[arg-type]
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2
    history += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                {"role": "user", "content": "then?"}]
    chunks = list(client.chat.completions.create(
        model="demo", messages=history, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens <= usage.prompt_tokens_details.cached_tokens \
        < usage.prompt_tokens
