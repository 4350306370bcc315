"""A soak test: a live gateway on the demo model under a steady mixed load for N minutes.

    python -m bench.soak [--minutes 10] [--concurrency 16] [--url URL]

Without ``--url`` it starts ``chatglm-gateway serve`` (demo model) on a free local port and stops
it at the end.  ``--concurrency`` clients loop over a mix of requests: streamed and whole chat
completions, legacy completions, JSON-schema answers, forced tool calls, clients that leave in
the middle of a stream, and bad requests (which must be 4xx).  Every ``--report`` seconds it
prints the requests so far by status, p50/p99 latency and the server's RSS; at the end a summary.

Exits non-zero on any 5xx, on a request that fails without an HTTP answer, or when the server's
RSS grew more than 10 % after the warm-up (the first fifth of the run).  Traffic goes to
127.0.0.1 only; the loops are bounded by the duration.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "n"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 10}},
    "required": ["q"]}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _body(kind: str, rng: random.Random) -> tuple[str, dict]:
    text = rng.choice(["你好", "Tell me a story.", "写一首诗", "What is 2+2?", "介绍一下北京"])
    chat = {"model": "chatglm2-demo", "messages": [{"role": "user", "content": text}],
            "max_tokens": rng.randint(4, 48)}
    if kind == "completion":
        return "/v1/completions", {"model": "chatglm2-demo", "prompt": text, "max_tokens": 16}
    if kind == "json":
        return "/v1/chat/completions", chat | {"response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
            "max_tokens": 64}
    if kind == "tool":
        return "/v1/chat/completions", chat | {"tools": [TOOL], "tool_choice": "required",
                                               "max_tokens": 64}
    if kind == "bad":
        return "/v1/chat/completions", rng.choice([
            chat | {"temperature": "hot"}, chat | {"seed": 2**64}, chat | {"n": 99},
            {"model": "chatglm2-demo", "messages": []}, chat | {"model": "nope"}])
    return "/v1/chat/completions", chat | {"temperature": rng.choice([0.0, 0.8])}


async def client(url: str, deadline: float, seed: int, stats: dict) -> None:
    rng = random.Random(seed)
    kinds = ["chat", "stream", "completion", "json", "tool", "leave", "bad"]
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            kind = rng.choice(kinds)
            path, body = _body(kind, rng)
            start = time.monotonic()
            try:
                if kind in ("stream", "leave"):
                    async with http.stream("POST", path, json=body | {"stream": True}) as r:
                        status = r.status_code
                        lines = 0
                        async for _ in r.aiter_lines():
                            lines += 1
                            if kind == "leave" and lines >= 3:
                                break  # the client vanishes mid-stream
                else:
                    r = await http.post(path, json=body)
                    status = r.status_code
            except httpx.HTTPError as exc:
                stats["transport_errors"].append(f"{kind}: {exc!r}")
                continue
            stats["statuses"][status] += 1
            stats["latency"].append(time.monotonic() - start)
            if kind == "bad" and not 400 <= status < 500:
                stats["bad_not_4xx"] += 1


def report(stats: dict, pid: int | None, started: float) -> str:
    lat = sorted(stats["latency"]) or [0.0]
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    rss = f"{rss_mib(pid):.0f} MiB" if pid else "n/a"
    statuses = " ".join(f"{k}:{v}" for k, v in sorted(stats["statuses"].items()))
    return (f"{time.monotonic() - started:6.0f} s  requests {sum(stats['statuses'].values())}  "
            f"[{statuses}]  p50 {p50:.2f} s  p99 {p99:.2f} s  RSS {rss}")


async def soak(url: str, minutes: float, concurrency: int, every: float,
               pid: int | None) -> int:
    stats: dict = {"statuses": collections.Counter(), "latency": [], "transport_errors": [],
                   "bad_not_4xx": 0}
    started = time.monotonic()
    deadline = started + 60 * minutes
    warm_rss: float | None = None
    peak_after_warmup = 0.0
    tasks = [asyncio.create_task(client(url, deadline, i, stats)) for i in range(concurrency)]
    while not all(t.done() for t in tasks):
        await asyncio.sleep(min(every, max(deadline - time.monotonic(), 0.1)))
        print(report(stats, pid, started), flush=True)
        if pid:
            rss = rss_mib(pid)
            if warm_rss is None and time.monotonic() - started >= 0.2 * 60 * minutes:
                warm_rss = rss
            elif warm_rss is not None:
                peak_after_warmup = max(peak_after_warmup, rss)
    await asyncio.gather(*tasks)
    print("\nfinal: " + report(stats, pid, started))
    failures = []
    server_errors = sum(v for k, v in stats["statuses"].items() if k >= 500)
    if server_errors:
        failures.append(f"{server_errors} responses with status >= 500")
    if stats["transport_errors"]:
        failures.append(f"{len(stats['transport_errors'])} requests failed without an answer, "
                        f"e.g. {stats['transport_errors'][0]}")
    if stats["bad_not_4xx"]:
        failures.append(f"{stats['bad_not_4xx']} bad requests not answered 4xx")
    if warm_rss and peak_after_warmup > 1.10 * warm_rss:
        failures.append(f"RSS grew from {warm_rss:.0f} to {peak_after_warmup:.0f} MiB after "
                        "warm-up (> 10 %)")
    if warm_rss:
        print(f"RSS after warm-up {warm_rss:.0f} MiB, peak later {peak_after_warmup:.0f} MiB "
              f"({100 * (peak_after_warmup / warm_rss - 1):+.1f} %)")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--report", type=float, default=30.0, help="seconds between reports")
    parser.add_argument("--url", help="a running gateway (default: start one on the demo model)")
    args = parser.parse_args()
    if args.url:
        sys.exit(asyncio.run(soak(args.url, args.minutes, args.concurrency, args.report, None)))
    port = _free_port()
    cache = Path(os.environ.get("CHATGLM_GATEWAY_CACHE", Path(tempfile.gettempdir()) /
                                "chatglm-gateway-bench"))
    env = {**os.environ, "CHATGLM_GATEWAY_CACHE": str(cache)}
    server = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--max-running", "8",
         "--max-waiting", "64", "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            sys.exit("the gateway did not become ready")
        code = asyncio.run(soak(url, args.minutes, args.concurrency, args.report, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    if server.returncode not in (0, None):
        print(f"FAIL: the gateway exited with {server.returncode} after SIGTERM")
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
