"""/health and /ready through loading, failure and draining; a SIGTERM drain in a subprocess."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.fake import FakeChatModel
from tests.server import REPO, free_port, running_server

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture()
def gated_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, threading.Event]:
    """A registry whose loads block until the test releases them (id -> Event)."""
    gates: dict[str, threading.Event] = {}

    def load_chat_model(model_id: str, path: Path, **kwargs: Any) -> FakeChatModel:
        gate = gates.setdefault(model_id, threading.Event())
        assert gate.wait(10), f"{model_id} was never released"
        if model_id == "bad":
            raise RuntimeError("weights are corrupt")
        return FakeChatModel(model_id, reply=f"from {model_id}")

    registry = types.ModuleType("adapters.registry")
    registry.load_chat_model = load_chat_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "adapters.registry", registry)
    for name in ("a", "b", "bad"):
        gates[name] = threading.Event()
    return gates


def test_ready_goes_from_loading_to_ready(gated_registry: dict[str, threading.Event]) -> None:
    settings = ServerSettings(models=(
        ModelEntry(id="a", path=Path("pa")), ModelEntry(id="b", path=Path("pb"),
                                                        aliases=("bee",))))
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        # the server answers while the first model is still loading
        assert http.get("/health").json() == {"status": "ok"}
        loading = http.get("/ready")
        assert loading.status_code == 503
        assert loading.json()["error"]["code"] == "models_loading"
        assert http.get("/v1/models").json()["data"] == []
        for name in ("a", "bee"):
            r = http.post("/v1/chat/completions", json={"model": name, **CHAT})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert http.post("/v1/chat/completions", json={"model": "zzz", **CHAT}
                         ).status_code == 404
        assert http.post("/", json={"prompt": "x"}).status_code == 503

        gated_registry["a"].set()  # a loads and serves while b still loads
        wait_for(lambda: [m["id"] for m in http.get("/v1/models").json()["data"]] == ["a"])
        assert http.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
        assert http.get("/ready").status_code == 503

        gated_registry["b"].set()
        wait_for(lambda: http.get("/ready").status_code == 200)
        assert http.get("/ready").json() == {"status": "ready"}
        assert http.post("/v1/chat/completions", json={"model": "bee", **CHAT}
                         ).json()["choices"][0]["message"]["content"] == "from b"


def test_failed_load_keeps_ready_503_and_reports(gated_registry: dict[str, threading.Event],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    settings = ServerSettings(models=(ModelEntry(id="bad", path=Path("p")),))
    app = create_app(settings)
    failures: list[str] = []
    app.state.lifecycle.on_failure = lambda: failures.append(app.state.lifecycle.reason)
    with caplog.at_level(logging.ERROR), running_server(app) as url:
        gated_registry["bad"].set()
        wait_for(lambda: httpx.get(f"{url}/ready").json()["error"]["code"] == "model_load_failed")
        assert "weights are corrupt" in httpx.get(f"{url}/ready").json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200
    assert failures == ["'bad': weights are corrupt"]
    assert any("loading model 'bad' failed" in r.getMessage() for r in caplog.records)


def test_drain_lets_running_streams_finish_and_refuses_new_requests() -> None:
    slow = FakeChatModel("slow", reply="abcdefghij", delay=0.05)
    app = create_app(ServerSettings(), models={"slow": slow})
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/ready").status_code == 200
        with http.stream("POST", "/v1/chat/completions",
                         json={"model": "slow", "stream": True, **CHAT}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            app.state.lifecycle.drain(30.0)  # what SIGTERM does first (gateway.serving)
            refused = http.post("/v1/completions", json={"model": "slow", "prompt": "x"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_draining"
            assert http.post("/", json={"prompt": "x"}).status_code == 503
            assert http.get("/ready").json()["error"]["code"] == "server_draining"
            assert http.get("/health").status_code == 200
            rest = [line for line in lines if line]
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in rest[:-1] if json.loads(line[6:])["choices"])
        assert rest[-1] == "data: [DONE]"
        assert text == "abcdefghij"  # the first line read was the role chunk
    assert slow.counters.cancelled == 0 and slow.counters.finished == 1


SERVER_SCRIPT = textwrap.dedent("""
    import logging, sys
    from tests.fake import FakeChatModel
    from gateway.app import create_app
    from gateway.serving import run
    from gateway.settings import ServerSettings

    logging.basicConfig(level="INFO")
    settings = ServerSettings(port=int(sys.argv[1]), shutdown_grace=float(sys.argv[2]),
                              log_level="info")
    model = FakeChatModel("slow", reply="x" * 40, delay=0.05)  # ~2 s of streaming
    sys.exit(run(create_app(settings, models={"slow": model}), settings))
""")


@pytest.fixture()
def server_process(tmp_path: Path) -> Iterator[Callable[[float], tuple[subprocess.Popen[str], str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(grace: float) -> tuple[subprocess.Popen[str], str]:
        port = free_port()
        script = tmp_path / "serve.py"
        script.write_text(SERVER_SCRIPT, encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, str(script), str(port), str(grace)], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return proc.poll() is None and False
        wait_for(up, timeout=30)
        return proc, url

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_sigterm_drains_a_stream_in_flight(server_process: Any) -> None:
    proc, url = server_process(30.0)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=20,
                      json={"model": "slow", "stream": True, **CHAT}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"  # the stream finished although the server was stopping
    assert not any('"error"' in line for line in rest)
    # a drain that ran to its end is a clean exit
    assert proc.wait(timeout=20) == 0
    assert proc.stdout is not None
    log = proc.stdout.read()
    assert "draining" in log


def test_grace_period_cancels_what_is_left(server_process: Any) -> None:
    proc, url = server_process(0.5)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=20,
                      json={"model": "slow", "stream": True, **CHAT}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    # the stream is ended by the gateway before uvicorn would cut it: an error event, [DONE]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "server_draining" and error["type"] == "server_error"
    assert proc.wait(timeout=20) == 0


def test_demo_checkpoint_loads_in_the_background(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from adapters.demo import ensure_demo_checkpoint

    path = ensure_demo_checkpoint(tmp_path)
    settings = ServerSettings(models=(ModelEntry(id="demo", path=path, device="cpu"),),
                              max_running=2, max_waiting=3)
    with caplog.at_level(logging.INFO, logger="gateway.loading"), \
            running_server(create_app(settings)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, timeout=60)
        r = httpx.post(f"{url}/v1/chat/completions",
                       json={"model": "demo", "max_tokens": 3, **CHAT}, timeout=30)
        assert r.status_code == 200
    (line,) = [r.getMessage() for r in caplog.records if "ready:" in r.getMessage()]
    for part in ("'demo'", "family=chatglm2", "dtype=float32", "device=cpu",
                 "quantization=none", "context=", "max_running=2", "max_waiting=3", "GiB"):
        assert part in line


def test_sigterm_with_four_streams_running(server_process: Any) -> None:
    """Four streams in flight when SIGTERM comes: each finishes with [DONE] within the grace,
    and the server exits 0."""
    proc, url = server_process(30.0)

    def stream() -> list[str]:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          json={"model": "slow", "stream": True, **CHAT}) as response:
            return [line for line in response.iter_lines() if line]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream) for _ in range(4)]
        wait_for(lambda: 'requests_running{model="slow"} 4.0' in
                 httpx.get(f"{url}/metrics").text, timeout=10)
        proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=30) for f in futures]
    for lines in results:
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert proc.wait(timeout=20) == 0


def test_idle_sigterm_and_sigint_exit_0(server_process: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc, _ = server_process(5.0)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0


def test_sigkill_ends_streams_at_once_and_a_new_server_serves(server_process: Any) -> None:
    proc, url = server_process(30.0)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=20,
                      json={"model": "slow", "stream": True, **CHAT}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        proc.kill()
        with pytest.raises(httpx.TransportError):  # the client learns at once: no hang
            for _ in lines:
                pass
    assert proc.wait(timeout=10) == -signal.SIGKILL
    _, url = server_process(30.0)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "slow", **CHAT}, timeout=20)
    assert r.status_code == 200
