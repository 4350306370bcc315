"""Time to first token across the turns of a chat served by two Ray Serve replicas
(``serve --ray --replicas 2``), with the gateway's conversation-affinity routing and without it.

    python -m bench.affinity [--preset mid] [--turns 10] [--user-tokens 150] [--answer-tokens 32]

A chat client resends the whole history every turn.  Only the replica that served the previous
turn holds that history's KV cache (the prefix cache); the conversation-affinity router
(``adapters/distributed/router.py``) sends each turn there, so time to first token stays flat as
the history grows.  Ray Serve's default router picks the less loaded of two random replicas, and
a turn that lands on the other replica prefills the whole history again.

1. Writes (once, reused) the random ``mid`` checkpoint folder of ``bench.serving``.
2. Starts ``python -m gateway serve --ray --replicas 2`` in a subprocess (a local Ray cluster)
   serving that folder as two models: ``affinity`` and ``default`` (``affinity = false`` in its
   config entry), two replicas each.
3. Runs, per model, two conversations turn by turn, alternating (both replicas get work, so a
   router that ignored conversations mixes them up), and the two models' turns alternate too:
   user turns of ``--user-tokens`` tokens of corpus text, answers of ``--answer-tokens`` greedy
   tokens with eos banned, each answer appended to the history as the client would.  Prints, per
   turn of each model's first chat: prompt tokens, tokens served from the prefix cache
   (``usage.prompt_tokens_details.cached_tokens``), the replica (``X-Replica``) and the time to
   first token; then TTFT turn N / turn 1 and slowest turn / turn 1 per model and chat.

The answers are text that tokenizes back to the ids the model generated (``--answers
round-trip``, see ``bench.workload.round_trip_answers``), as a trained model's answers do, so the
prefix cache can serve them next turn; ``--answers raw`` keeps the random model's arbitrary ids,
whose text comes back as other ids, so every turn also prefills the previous answer again.

Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import add_model_arguments, machine_summary, markdown_table, shape_from_args
from bench.serving import serve_process
from bench.workload import (
    ANSWERS,
    NO_EOS,
    add_answers_argument,
    load_tokenizer,
    user_text,
    write_checkpoint,
)

logger = logging.getLogger("bench.affinity")
MODELS = ("affinity", "default")  # the same checkpoint, routed with and without affinity


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int
    cached_tokens: int
    replica: str
    ttft: float
    answer: str


@contextmanager
def ray_gateway(folder: Path, replicas: int, cache_dir: Path) -> Iterator[str]:
    """``python -m gateway serve --ray`` on 127.0.0.1 until the block ends; yields its URL."""
    config = cache_dir / "affinity.yaml"  # JSON is YAML
    # Half a CPU per replica: the four replicas fit on two cores (one request runs at a time).
    config.write_text(json.dumps({"models": [
        {"id": model, "path": str(folder), "dtype": "bfloat16", "device": "cpu",
         "num_cpus": 0.5, "kv_cache_memory": 0.25, "affinity": model == "affinity"}
        for model in MODELS]}))
    with serve_process(["--ray", "--replicas", str(replicas), "--config", str(config)],
                       poll=1.0, stop_timeout=120) as url:
        yield url


def one_turn(client: httpx.Client, model: str, messages: list[dict], max_tokens: int,
             bias: tuple[tuple[int, float], ...] = NO_EOS) -> Turn:
    body = {"model": model, "messages": messages, "stream": True, "temperature": 0,
            "max_tokens": max_tokens, "logit_bias": {str(i): b for i, b in bias},
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage: dict = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        replica = response.headers.get("X-Replica", "?")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                text = choice["delta"].get("content") or ""
                if text and ttft is None:
                    ttft = time.perf_counter() - start
                parts.append(text)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Turn(usage.get("prompt_tokens", 0), cached, replica,
                ttft if ttft is not None else time.perf_counter() - start, "".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default_preset="mid")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--user-tokens", type=int, default=150)
    parser.add_argument("--answer-tokens", type=int, default=32)
    add_answers_argument(parser)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "chatglm-gateway-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shape = shape_from_args(args)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    folder = write_checkpoint(args.cache_dir / f"{shape.preset}-{shape.config.num_layers}",
                              shape, args.cache_dir)
    tokenizer = load_tokenizer(args.cache_dir)
    bias = ANSWERS[args.answers](tokenizer)
    chats: dict[str, list[list[dict]]] = {model: [[], []] for model in MODELS}
    turns: dict[str, list[list[Turn]]] = {model: [[], []] for model in MODELS}
    with ray_gateway(folder, args.replicas, args.cache_dir) as url, \
            httpx.Client(base_url=url, timeout=600) as client:
        for model in MODELS:
            for _ in range(2 * args.replicas):  # every replica serves once before measuring
                one_turn(client, model, [{"role": "user", "content": "warm up"}], 2)
        for i in range(args.turns):
            for c in range(2):
                text = user_text(tokenizer, args.user_tokens, 11 * i + c)
                for model in MODELS:
                    history = chats[model][c]
                    history.append({"role": "user", "content": text})
                    turn = one_turn(client, model, history, args.answer_tokens, bias)
                    history.append({"role": "assistant", "content": turn.answer})
                    turns[model][c].append(turn)
                    logger.info("%s chat %d turn %d: %d prompt tokens (%d cached) on %s, "
                                "TTFT %.2f s", model, c + 1, i + 1, turn.prompt_tokens,
                                turn.cached_tokens, turn.replica, turn.ttft)
    print(f"\n{shape.describe()}; bf16; {args.replicas} Ray Serve replicas per model (half a "
          f"CPU each); {machine_summary()}; user turns of ~{args.user_tokens} tokens, answers "
          f"of {args.answer_tokens} tokens ({args.answers}); a second chat alternates with this one\n")
    rows = []
    for i, (on, off) in enumerate(zip(turns["affinity"][0], turns["default"][0], strict=True)):
        rows.append([str(i + 1), str(on.prompt_tokens), f"{on.cached_tokens} / {on.replica}",
                     f"{on.ttft:.2f}", f"{off.cached_tokens} / {off.replica}", f"{off.ttft:.2f}"])
    print(markdown_table(["turn", "prompt tokens", "affinity: cached / replica", "TTFT s",
                          "default router: cached / replica", "TTFT s"], rows))
    for model in MODELS:
        first, second = turns[model]
        print(f"\n{model}: TTFT turn {len(first)} / turn 1 = {first[-1].ttft / first[0].ttft:.2f} "
              f"(chat 2: {second[-1].ttft / second[0].ttft:.2f}), slowest turn / turn 1 = "
              f"{max(t.ttft for t in first) / first[0].ttft:.2f} (chat 2: "
              f"{max(t.ttft for t in second) / second[0].ttft:.2f}); chat 1 on "
              f"{len({t.replica for t in first})} replica(s), chat 2 on "
              f"{len({t.replica for t in second})}")


if __name__ == "__main__":
    main()
