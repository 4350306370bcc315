"""Decode speed with and without a grammar, and what the grammar's masks cost per step.

    python -m bench.structured [--preset mid] [--layers N] [--mode int4] [--streams 1,8]
                               [--max-tokens 64] [--repeats 3]

Straight into the engine (``prepare`` / ``generate``, no HTTP), greedy, every stream running to
``max_tokens``: free text (eos banned) against a JSON-schema answer (an array of at least 40
``{"k": str, "v": int}`` objects, so it never completes early).  Runs alternate free / grammar,
``--repeats`` times each.  The masks' own time is measured in the same runs by timing
:meth:`TokenGrammar.mask_batch` (llguidance's bit masks plus applying them to the rows), and shown
beside the decode step it is part of.  Prints a Markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adapters.base import ChatRequest, GrammarSpec, Message, SamplingParams
from adapters.chat_model import TorchChatModel
from adapters.runtime.grammar import TokenGrammar
from bench.common import (
    MODES,
    add_model_arguments,
    build_model,
    machine_summary,
    markdown_table,
    shape_from_args,
)
from bench.workload import NO_EOS, load_tokenizer, served, user_text

logger = logging.getLogger("bench.structured")

SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object", "properties": {"k": {"type": "string", "maxLength": 6},
                                     "v": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["k", "v"], "additionalProperties": False}}
GRAMMAR = GrammarSpec(kind="json_schema", value=json.dumps(SCHEMA))


class MaskTimer:
    """Wraps ``TokenGrammar.mask_batch`` to add up the time spent in it."""

    def __init__(self, grammar: TokenGrammar) -> None:
        self.seconds = 0.0
        self.calls = 0
        inner = grammar.mask_batch

        def timed(*args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            try:
                inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        grammar.mask_batch = timed  # type: ignore[method-assign]


async def _one(model: TorchChatModel, text: str, params: SamplingParams,
               grammar: GrammarSpec | None) -> int:
    prompt = model.prepare(ChatRequest((Message("user", text),), params, grammar=grammar))
    tokens = 0
    async for delta in model.generate(prompt):
        if delta.usage is not None:
            tokens = delta.usage.completion_tokens
    return tokens


def run(model: TorchChatModel, prompts: list[str], max_tokens: int,
        grammar: GrammarSpec | None) -> tuple[float, int]:
    """(wall seconds, completion tokens) of all ``prompts`` at once."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                            logit_bias=() if grammar else NO_EOS)

    async def main() -> list[int]:
        return await asyncio.gather(*(_one(model, p, params, grammar) for p in prompts))

    start = time.perf_counter()
    tokens = asyncio.run(main())
    return time.perf_counter() - start, sum(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default_preset="mid")
    parser.add_argument("--mode", default="int4", choices=sorted(MODES))
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "chatglm-gateway-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = shape_from_args(args)
    tokenizer = load_tokenizer(args.cache_dir)
    model = served(build_model(shape, args.mode), tokenizer, max_running=16, prefix_cache=False)
    assert model.grammar is not None
    timer = MaskTimer(model.grammar)
    rows = []
    try:
        for streams in [int(s) for s in args.streams.split(",")]:
            prompts = [user_text(tokenizer, args.prompt_tokens, offset=7 * i)
                       for i in range(streams)]
            run(model, prompts, 4, GRAMMAR)  # warm-up: compile, first allocations
            free: list[float] = []
            constrained: list[float] = []
            mask_ms: list[float] = []
            for _ in range(args.repeats):
                wall, tokens = run(model, prompts, args.max_tokens, None)
                free.append(tokens / wall)
                timer.seconds, timer.calls = 0.0, 0
                wall, tokens = run(model, prompts, args.max_tokens, GRAMMAR)
                constrained.append(tokens / wall)
                mask_ms.append(1000 * timer.seconds / max(timer.calls, 1))
            step_ms = 1000 * streams / statistics.median(constrained)
            rows.append([str(streams), f"{statistics.median(free):.1f}",
                         f"{statistics.median(constrained):.1f}",
                         f"{statistics.median(constrained) / statistics.median(free):.2f}",
                         f"{statistics.median(mask_ms):.2f}", f"{step_ms:.1f}",
                         f"{100 * statistics.median(mask_ms) / step_ms:.1f}%"])
            logger.info("streams %d: %s", streams, rows[-1])
    finally:
        model.close()
    print(f"\n{shape.describe()}, {args.mode}; {machine_summary()}; {args.max_tokens} tokens "
          f"per stream, median of {args.repeats} alternating runs\n")
    print(markdown_table(["streams", "free tok/s", "grammar tok/s", "grammar / free",
                          "mask ms per step", "decode step ms", "mask share of step"], rows))


if __name__ == "__main__":
    main()
