"""Streaming throughput and time to first token through the HTTP gateway, against the same model
and requests run straight through the engine in-process: the gateway's overhead per token.

    python -m bench.serving [--preset mid] [--quantize 4] [--concurrency 1,4,8,16] [--max-tokens 32]

1. Writes (once, reused) a random mid-size checkpoint folder in THUDM's layout (safetensors) with
   the demo tokenizer, under ``--cache-dir``.
2. Direct: loads it in this process with ``load_chat_model`` (the gateway's loader) and runs, per
   concurrency level, that many simultaneous requests through ``prepare`` / ``generate``.
3. HTTP: starts ``python -m gateway serve`` on the same folder and options in a subprocess (a real
   deployment: the client does not share the server's GIL), and sends the same requests with the
   official ``openai`` async client, streaming, ``stream_options.include_usage``.

Direct and HTTP runs alternate at every repeat (each side idles while the other runs).

Every request bans eos with ``logit_bias`` so every stream runs to ``max_tokens``; prompts differ
from each other at their first line so the prefix cache cannot serve one request from another.
Figures are the best of ``--repeats`` runs (other processes share the cores).  Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from adapters.registry import load_chat_model
from bench.common import add_model_arguments, machine_summary, markdown_table, shape_from_args
from bench.workload import (
    EOS_ID,
    RunResult,
    StreamResult,
    direct_run,
    load_tokenizer,
    user_text,
    write_checkpoint,
)

logger = logging.getLogger("bench.serving")
MODEL_ID = "bench"
STARTUP_TIMEOUT = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def gateway_process(folder: Path, quantize: str | None, max_running: int) -> Iterator[str]:
    """``python -m gateway serve`` of ``folder`` on 127.0.0.1 until the block ends; yields its
    base URL once ``/ready`` answers (the model loads after the server starts)."""
    flags = ["--model", f"{MODEL_ID}={folder}", "--dtype", "bfloat16", "--device", "cpu",
             "--max-running", str(max_running)]
    if quantize:
        flags += ["--quantize", quantize]
    with serve_process(flags) as url:
        yield url


@contextmanager
def serve_process(flags: list[str], poll: float = 0.5, stop_timeout: float = 30) -> Iterator[str]:
    """``python -m gateway serve --port PORT --log-level warning *flags`` until the block ends;
    yields its base URL once ``/ready`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(port),
           "--log-level", "warning", *flags]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, cwd=repo, env=os.environ | {"PYTHONPATH": str(repo)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {proc.returncode} during start-up")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not become ready")
            time.sleep(poll)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=stop_timeout)


async def http_stream(client: AsyncOpenAI, prompt: str, max_tokens: int) -> StreamResult:
    start = time.perf_counter()
    ttft = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": prompt}], stream=True,
        max_tokens=max_tokens, temperature=0, logit_bias={str(EOS_ID): -100},
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter() - start
    return StreamResult(ttft if ttft is not None else end, end, tokens)


async def http_run(url: str, prompts: list[str], max_tokens: int) -> RunResult:
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0,
                           timeout=600) as client:
        start = time.perf_counter()
        streams = await asyncio.gather(*(http_stream(client, p, max_tokens) for p in prompts))
        return RunResult(tuple(streams), time.perf_counter() - start)


def sweep(runs: dict[str, Callable[[list[str]], RunResult]],
          prompts: Callable[[int], list[str]], levels: list[int],
          repeats: int) -> dict[str, dict[int, RunResult]]:
    """Best-aggregate run per runner and concurrency level (after one warm-up request each).
    The runners take turns at every repeat, so a change in the host's load between runs hits
    both sides alike instead of biasing the comparison."""
    for run in runs.values():
        run(prompts(1))
    best: dict[str, dict[int, RunResult]] = {label: {} for label in runs}
    for c in levels:
        for _ in range(repeats):
            for label, run in runs.items():
                result = run(prompts(c))
                logger.info("%s c=%d: %.1f tok/s, TTFT p50 %.2f s", label, c, result.aggregate,
                            result.ttft_percentile(50))
                if c not in best[label] or result.aggregate > best[label][c].aggregate:
                    best[label][c] = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default_preset="mid")
    parser.add_argument("--quantize", default="4", help="'4', '8', 'int4-g128' or 'none'")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "chatglm-gateway-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for chatty in ("httpx", "openai"):  # one INFO line per request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    shape = shape_from_args(args)
    quantize = None if args.quantize == "none" else args.quantize
    levels = [int(c) for c in args.concurrency.split(",")]
    folder = write_checkpoint(args.cache_dir / f"{shape.preset}-{shape.config.num_layers}",
                              shape, args.cache_dir)
    logger.info("checkpoint %s (%s)", folder, shape.describe())
    tokenizer = load_tokenizer(args.cache_dir)
    counter = iter(range(1_000_000))

    def prompts(n: int) -> list[str]:  # fresh first lines every time: no cross-request reuse
        return [user_text(tokenizer, args.prompt_tokens, next(counter) * 7) for _ in range(n)]

    # The server idles (model loaded) while the in-process engine runs, and the other way round.
    with gateway_process(folder, quantize, max(levels)) as url:
        model = load_chat_model(MODEL_ID, folder, dtype="bfloat16", device="cpu",
                                quantize=quantize, max_running=max(levels))
        try:
            results = sweep(
                {"direct": lambda p: asyncio.run(direct_run(model, p, args.max_tokens)),
                 "http": lambda p: asyncio.run(http_run(url, p, args.max_tokens))},
                prompts, levels, args.repeats)
        finally:
            model.close()
    direct, http = results["direct"], results["http"]

    rows = []
    for c in levels:
        d, h = direct[c], http[c]
        rows.append([str(c), f"{d.aggregate:.1f}", f"{h.aggregate:.1f}",
                     f"{1 - h.aggregate / d.aggregate:+.1%}",
                     f"{d.ttft_percentile(50):.2f} / {d.ttft_percentile(95):.2f}",
                     f"{h.ttft_percentile(50):.2f} / {h.ttft_percentile(95):.2f}"])
    print(f"\n{shape.describe()}; weights {args.quantize}; {machine_summary()}; "
          f"{args.prompt_tokens}-token prompts, {args.max_tokens} tokens per stream, "
          f"best of {args.repeats}\n")
    print(markdown_table(["streams", "direct tok/s", "HTTP tok/s", "gateway overhead",
                          "direct TTFT p50 / p95 s", "HTTP TTFT p50 / p95 s"], rows))
    if 1 in levels and 8 in levels:
        print(f"\naggregate(8) / aggregate(1): direct {direct[8].aggregate / direct[1].aggregate:.2f}"
              f", HTTP {http[8].aggregate / http[1].aggregate:.2f}")


if __name__ == "__main__":
    main()
