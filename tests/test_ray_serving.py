"""``chatglm-gateway serve --ray --replicas 2`` as a user runs it: its own process, a local Ray
cluster it starts, two Ray Serve replicas of a tiny ChatGLM2 checkpoint, queried over HTTP.

One server serves the whole module (Ray starts slowly on two cores); the tests run in file
order and the last one stops it with SIGTERM and checks that no Ray process is left.  It serves
THUDM's tiny ChatGLM2 checkpoint from the reference material or, where that is absent, the
project's own tiny ChatGLM2 folder: only the comparison with THUDM's outputs needs the former.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch

from adapters.registry import default_kv_bytes
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.conftest import chatglm2_tiny_checkpoint, oracle
from tests.server import REPO, free_port, running_server

MODEL = "glm2"
START_TIMEOUT = 240.0
#: ids fed after the prompt never include eos: answers run to max_tokens (chatglm2's eos is 2)
NO_EOS = {"2": -100}
#: the model's settings, with or without Ray
ENTRY = {"id": MODEL, "dtype": "float32", "max_running": 4, "max_waiting": 16}
#: two single turns and one with history, Chinese and English
CONVERSATIONS = [
    [{"role": "user", "content": "Good morning! What can you do?"}],
    [{"role": "user", "content": "请介绍一下长城的历史。"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
     {"role": "user", "content": "How many days are in a leap year?"}],
]


@dataclass
class RayServer:
    proc: subprocess.Popen[str]
    base: str
    log: list[str]
    checkpoint: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0)

    def replicas(self) -> list[dict]:
        card = httpx.get(f"{self.base}/v1/models/{MODEL}", timeout=10).json()
        return list(card["replicas"])


def _read_log(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Ray's raylet, GCS server and workers among them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll ``condition()`` until true; the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} within {timeout} s"
        time.sleep(0.25)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    path = chatglm2_tiny_checkpoint(tmp_path_factory)
    config = tmp_path_factory.mktemp("ray") / "gateway.yaml"
    # num_cpus 0.5: both replicas fit on a 2-core machine beside the gateway.
    config.write_text(json.dumps({"models": [{**ENTRY, "path": str(path), "num_cpus": 0.5}]}))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--ray", "--replicas", "2", "--port",
         str(port), "--config", str(config), "--shutdown-grace", "5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    log: list[str] = []
    reader = threading.Thread(target=_read_log, args=(proc, log), daemon=True)
    reader.start()
    ray_server = RayServer(proc, f"http://127.0.0.1:{port}", log, path)
    try:
        def ready() -> bool:
            assert proc.poll() is None, "".join(log)
            try:
                return httpx.get(ray_server.base + "/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(ready, START_TIMEOUT, "the server is ready")
        # /ready needs one replica per model; the other reports within a second
        _wait_for(lambda: len(ray_server.replicas()) == 2, 30, "both replicas report")
        yield ray_server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def _answer(server: RayServer, content: str, **kwargs: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 8, **kwargs}
    return httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)


def test_answers_exactly_like_the_single_process_server(server: RayServer) -> None:
    """The same checkpoint and model settings served without Ray, in this process: the greedy
    answers through Ray, whole and streamed, are the same text and token counts."""
    alone = create_app(ServerSettings(models=(ModelEntry(**ENTRY, path=server.checkpoint),)))
    with running_server(alone, wait_ready=True) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as local:
        expected = [local.chat.completions.create(model=MODEL, messages=messages,
                                                  temperature=0, max_tokens=16)
                    for messages in CONVERSATIONS]
    # random weights never pick eos within 16 greedy tokens here: all 16 are compared
    assert [want.usage.completion_tokens for want in expected] == [16] * len(CONVERSATIONS)
    client = server.client()
    for messages, want in zip(CONVERSATIONS, expected, strict=True):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=16)
        answer = raw.parse()
        assert answer.choices[0].message.content == want.choices[0].message.content
        assert answer.usage.prompt_tokens == want.usage.prompt_tokens
        assert answer.usage.completion_tokens == want.usage.completion_tokens
        assert raw.headers["X-Replica"] in {r["id"] for r in server.replicas()}
        streamed = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=16, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed
                       if chunk.choices)
        assert text == want.choices[0].message.content


def test_a_prediction_crosses_to_the_replicas(server: RayServer) -> None:
    """``prediction`` reaches the replica's engine: the same answer as without, most of the
    prediction accepted (usage details come back through Ray), the drafts on /metrics."""
    client = server.client()
    messages = CONVERSATIONS[0]
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                           max_tokens=16)
    text = plain.choices[0].message.content
    predicted = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=16,
        prediction={"type": "content", "content": text})
    assert predicted.choices[0].message.content == text
    details = predicted.usage.completion_tokens_details
    assert details is not None
    assert details.accepted_prediction_tokens >= predicted.usage.completion_tokens - 2
    name = "chatglm_gateway_speculative_accepted_tokens_total"
    # the replicas' counts reach the gateway with their next status report
    _wait_for(lambda: f'{name}{{model="{MODEL}"}}' in httpx.get(f"{server.base}/metrics",
                                                                 timeout=10).text,
              30, "the drafts on /metrics")
    assert _metric(server, name) > 0


def test_answers_match_thudms_reference_code(server: RayServer) -> None:
    """THUDM's ``model.chat`` on its tiny checkpoint (reference material only): the same answer
    and prompt length through Ray."""
    client = server.client()
    for case in oracle("chatglm2-6b-tiny")["cases"][:3]:  # two single turns, one with history
        messages = [{"role": role, "content": text} for q, a in case["history"]
                    for role, text in (("user", q), ("assistant", a))]
        messages.append({"role": "user", "content": case["query"]})
        answer = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                max_tokens=16)
        assert answer.choices[0].message.content == case["chat_response"]
        assert answer.usage.prompt_tokens == len(case["inputs"]["input_ids"][0])


def test_sixteen_concurrent_requests_spread_over_both_replicas(server: RayServer) -> None:
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: _answer(server, f"question number {i}: why?"),
                                range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    used = {a.headers["X-Replica"] for a in answers}
    assert used == {r["id"] for r in server.replicas()} and len(used) == 2


def test_bad_requests_are_400_before_any_byte(server: RayServer) -> None:
    too_long = _answer(server, "hello", max_tokens=10**6)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert too_long.json()["error"]["param"] == "messages"
    bad_schema = _answer(server, "hello", response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert bad_schema.status_code == 400
    assert bad_schema.json()["error"]["param"] == "response_format"
    assert _answer(server, "still serving").status_code == 200


def test_token_counting_responses_and_scored_prompts_work_through_ray(server: RayServer) -> None:
    """The rest of the surface crosses the replica boundary too: /tokenize counts what a chat
    completion's usage says, /detokenize inverts it, a bad id is a 400, /v1/responses answers
    and an echoed prompt is scored."""
    messages = [{"role": "user", "content": "how many tokens is this?"}]
    counted = httpx.post(f"{server.base}/tokenize", json={"model": MODEL, "messages": messages},
                         timeout=60)
    assert counted.status_code == 200, counted.text
    usage = _answer(server, messages[0]["content"]).json()["usage"]
    assert counted.json()["count"] == usage["prompt_tokens"]
    ids = httpx.post(f"{server.base}/tokenize", timeout=60, json={
        "model": MODEL, "prompt": "hello world", "add_special_tokens": False}).json()["tokens"]
    text = httpx.post(f"{server.base}/detokenize", json={"model": MODEL, "tokens": ids},
                      timeout=60)
    assert text.json()["prompt"] == "hello world"
    bad = httpx.post(f"{server.base}/detokenize", json={"model": MODEL, "tokens": [10**9]},
                     timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens.[0]"
    response = server.client().responses.create(model=MODEL, input="hello", temperature=0,
                                                max_output_tokens=4)
    assert response.status == "incomplete" and response.usage.output_tokens == 4
    scored = server.client().completions.create(model=MODEL, prompt="one two three", echo=True,
                                                logprobs=1, max_tokens=0)
    logprobs = scored.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) >= 2
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:])


def test_admission_counts_generations_over_the_replicas(server: RayServer) -> None:
    # 2 replicas x (4 running + 16 waiting): two requests of n=16 fit, a third does not
    def body(i: int) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": f"list {i} please"}],
                "n": 16, "stream": True, "logit_bias": NO_EOS, "max_tokens": 480}

    with httpx.Client(base_url=server.base, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body(1)) as first, \
                client.stream("POST", "/v1/chat/completions", json=body(2)) as second:
            assert first.status_code == second.status_code == 200
            refused = client.post("/v1/chat/completions", json={**body(3), "stream": False})
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        # the streams are gone (cancelled): the same request is admitted again
        _wait_for(lambda: all(r["running"] == 0 and r["waiting"] == 0
                              for r in server.replicas()), 30, "the replicas drop them")
        again = client.post("/v1/chat/completions", json={**body(3), "stream": False,
                                                         "max_tokens": 2})
        assert again.status_code == 200 and len(again.json()["choices"]) == 16


def _metric(server: RayServer, name: str) -> float:
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    line = next(line for line in text.splitlines()
                if line.startswith(f'{name}{{model="{MODEL}"}}'))
    return float(line.split()[-1])


def test_a_client_that_leaves_cancels_its_request_in_the_replica(server: RayServer) -> None:
    # the longest answer the tiny model's 512-token context allows, with eos banned
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me everything"}],
            "temperature": 0, "stream": True, "logit_bias": NO_EOS, "max_tokens": 480}
    cancelled = _metric(server, "chatglm_gateway_generations_cancelled_total")
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body,
                      timeout=60) as response:
        assert response.status_code == 200
        replica = response.headers["X-Replica"]
        assert sum(1 for _, line in zip(range(10), response.iter_lines(), strict=False)) == 10
    # The replica's engine counts the generation as cancelled (closed before its finish) and
    # drops it.
    _wait_for(lambda: _metric(server, "chatglm_gateway_generations_cancelled_total")
              == cancelled + 1, 10, "the replica cancels the generation")
    _wait_for(lambda: all(r["running"] == 0 for r in server.replicas() if r["id"] == replica),
              10, "the replica's engine drops the request")


def test_models_and_metrics_show_the_replicas(server: RayServer) -> None:
    replicas = server.replicas()
    assert len(replicas) == 2
    for replica in replicas:
        assert set(replica) == {"id", "node", "pid", "running", "waiting", "kv_cache_bytes"}
        assert replica["node"]
        assert _cmdline(replica["pid"]).startswith(f"ray::ServeReplica:{MODEL}")
    # No kv_cache_memory set: each replica's default budget is its share (0.5 CPU) of what one
    # process would take on this machine, so the replicas together stay within that.
    assert all(r["kv_cache_bytes"] > 0 for r in replicas)
    assert sum(r["kv_cache_bytes"] for r in replicas) <= default_kv_bytes(torch.device("cpu"))
    metrics = httpx.get(f"{server.base}/metrics", timeout=10).text
    assert f'chatglm_gateway_replicas{{model="{MODEL}"}} 2.0' in metrics
    assert f'chatglm_gateway_requests_running{{model="{MODEL}"}}' in metrics
    assert f'chatglm_gateway_kv_cache_usage_ratio{{model="{MODEL}"}}' in metrics
    # the earlier identical questions (streamed after their JSON twin) hit the prefix cache;
    # replicas report their counters every 0.5 s, so the last hit may not have arrived yet
    _wait_for(lambda: _metric(server, "chatglm_gateway_prefix_cache_hit_rate") > 0, 10,
              "a prefix-cache hit reported by a replica")


def test_each_conversation_stays_on_one_replica(server: RayServer) -> None:
    topics = ["the history of tea in southern China and its trade routes",
              "how rivers carve canyons over millions of years of erosion",
              "why the sky looks blue at noon and red at sunset",
              "the rules of chess and how a pawn may be promoted"]
    conversations = [[{"role": "user", "content": f"Please explain {t} in detail."}]
                     for t in topics]
    placed: list[list[str]] = [[] for _ in topics]
    for turn in range(4):
        for history, replicas in zip(conversations, placed, strict=True):
            r = httpx.post(f"{server.base}/v1/chat/completions", timeout=60, json={
                "model": MODEL, "messages": history, "temperature": 0, "max_tokens": 8})
            assert r.status_code == 200
            replicas.append(r.headers["X-Replica"])
            history += [r.json()["choices"][0]["message"],
                        {"role": "user", "content": f"And what about part {turn + 2}?"}]
    assert all(len(set(replicas)) == 1 for replicas in placed), placed
    assert len({replicas[0] for replicas in placed}) == 2, placed


def test_a_named_conversation_stays_on_one_replica_whatever_its_prompts(
        server: RayServer) -> None:
    # Prompts that share no prefix: by tokens alone each is a new conversation, and new
    # conversations take turns over the replicas.  Named (a header, or the body's user), the
    # four prompts of a name go to one replica, and a second name to the other one.
    names = {"header": ({"X-Session-Id": "ray-session-1"}, {}),
             "user": ({}, {"user": "ray-user-2"})}
    placed: dict[str, list[str]] = {how: [] for how in names}
    for how, (headers, fields) in names.items():
        for i in range(4):
            r = httpx.post(f"{server.base}/v1/chat/completions", timeout=60, headers=headers,
                           json={"model": MODEL, "temperature": 0, "max_tokens": 2, **fields,
                                 "messages": [{"role": "user", "content": f"{how} {i} " * 6}]})
            assert r.status_code == 200
            placed[how].append(r.headers["X-Replica"])
    assert all(len(set(where)) == 1 for where in placed.values()), placed
    assert placed["header"][0] != placed["user"][0], placed


def test_a_killed_replica_fails_only_its_requests_and_comes_back(server: RayServer) -> None:
    before = {r["id"] for r in server.replicas()}
    results: list[httpx.Response] = []
    stop = threading.Event()

    def keep_sending(sender: int) -> None:
        for i in itertools.count():  # new conversations: they spread over both replicas
            if stop.is_set():
                return
            results.append(_answer(server, f"sender {sender}, question {i}: are you there?",
                                   max_tokens=32))

    streaming = threading.Barrier(3)
    placed: dict[int, str] = {}

    def long_stream(i: int) -> list[str]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"story {i}, please"}],
                "temperature": 0, "stream": True, "logit_bias": NO_EOS, "max_tokens": 480}
        with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body,
                          timeout=120) as response:
            assert response.status_code == 200
            placed[i] = response.headers["X-Replica"]
            lines = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 10:
                        streaming.wait(timeout=60)  # both streams run: the kill may come
            return lines

    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(long_stream, i) for i in range(2)]
        senders = [pool.submit(keep_sending, i) for i in range(2)]
        try:
            streaming.wait(timeout=60)
            killed = placed[0]  # the replica of the first stream, by its process
            pid = next(r["pid"] for r in server.replicas() if r["id"] == killed)
            assert _cmdline(pid).startswith(f"ray::ServeReplica:{MODEL}")
            os.kill(pid, signal.SIGKILL)
            time.sleep(5.0)
            sent_after_kill = len(results)
            time.sleep(3.0)
        finally:
            stop.set()
        for sender in senders:
            sender.result(timeout=60)
        events = [stream.result(timeout=60) for stream in streams]
    # Every stream ends (no hang): on the killed replica with the gateway's in-band error
    # event (the stream had begun: the status was sent already), elsewhere normally.
    for i, lines in enumerate(events):
        if placed[i] == killed:
            error = json.loads(lines[-1][len("data: "):])["error"]
            assert error["code"] == "generation_cancelled", lines[-3:]
        else:
            assert lines[-1] == "data: [DONE]", lines[-3:]
    failed = [r for r in results if r.status_code != 200]
    # at most the two requests in flight on the killed replica fail, each cleanly
    assert len(failed) <= 2, [r.text for r in failed]
    for r in failed:
        assert r.status_code in (500, 503) and "error" in r.json(), r.text
    assert len(results) > sent_after_kill, "requests kept being answered after the kill"
    _wait_for(lambda: len(server.replicas()) == 2 and {r["id"] for r in server.replicas()}
              != before, 90, "Ray Serve replaces the killed replica")
    assert httpx.get(f"{server.base}/ready", timeout=10).status_code == 200
    assert _answer(server, "welcome back").status_code == 200


def test_sigterm_stops_the_server_and_every_ray_process(server: RayServer) -> None:
    ray_processes = {pid for pid in _descendants(server.proc.pid)
                     if any(name in _cmdline(pid) for name in ("ray::", "raylet", "gcs_server"))}
    assert ray_processes, "the server runs its own Ray cluster"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, "".join(server.log)
    _wait_for(lambda: not any(_alive(pid) for pid in ray_processes), 30,
              "every Ray process of the server exits")
    log = "".join(server.log)
    assert "Ray cluster stopped" in log


def test_without_ray_the_gateway_never_imports_it() -> None:
    code = ("import sys; from gateway.app import create_app; from gateway.cli import main; "
            "from gateway.settings import ServerSettings; create_app(ServerSettings()); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ray_flags_and_per_model_scale_settings(tmp_path: Path) -> None:
    from gateway import cli

    config = tmp_path / "gateway.toml"
    config.write_text('[[models]]\nid = "a"\npath = "/models/a"\nmin_replicas = 1\n'
                      'max_replicas = 4\ntarget_ongoing_requests = 6\nnum_gpus = 1\n'
                      'resources = { gpu_node = 1 }\naffinity = false\n\n'
                      '[[models]]\nid = "b"\npath = "/models/b"\nreplicas = 3\n')
    args = cli.build_parser().parse_args(
        ["serve", "--ray-address", "10.0.0.1:6379", "--replicas", "2", "--config", str(config)])
    settings = cli.settings_from_args(args)
    assert settings.ray and settings.ray_address == "10.0.0.1:6379"  # an address implies --ray
    a, b = settings.models
    assert settings.scale(a) == {"replicas": 2, "min_replicas": 1, "max_replicas": 4,
                                 "target_ongoing_requests": 6, "num_gpus": 1,
                                 "resources": {"gpu_node": 1}, "affinity": False}
    assert settings.scale(b) == {"replicas": 3, "resources": {}, "affinity": True}
    plain = cli.settings_from_args(cli.build_parser().parse_args(["serve"]))
    assert not plain.ray and plain.replicas == 1
