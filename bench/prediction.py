"""Predicted Outputs: decode tok/s and forward passes of a "predicted edit" with and without
the request's ``prediction``, alternating, in one run.

    python -m bench.prediction [--preset mid|6b] [--mode int4] [--threads N]
                               [--answer-tokens 300] [--repeats 3]

The workload is a code editor's: the prompt holds a ~300-token code-like text and asks for it
back with one line changed; the prediction is the text as it was.  The model is random (the
bench's in-memory ChatGLM2, made context-free as in ``bench/speculative.py``: ``make_local``), so
it cannot follow the instruction; what it answers instead is fixed first (its greedy answer to the
prompt, ``--answer-tokens`` long, eos banned), and the prediction is that answer with one line's
worth of ids (``--edit-tokens``, in the middle) replaced: an answer that differs from its
prediction by one line, which is what the edit request gives a real model.

One engine, the gateway's own, without ``--speculative`` (a prediction drafts on its own); each
repeat runs the request without and with the prediction (which goes first alternates) and
counts the model's forward calls of each (one per prefill chunk and per decode step).  Printed:
the best decode tok/s of each (tokens after the first, over the time after it: prefill left
out), the speed-up best/best and the median of the paired ratios, in wall and in this process's
CPU time (the host is shared: CPU time is what other processes' load stretches least), forward
passes, the usage's accepted / rejected prediction tokens, and whether the answers were
identical.  Asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from adapters.base import Delta, Prompt, SamplingParams, Usage
from adapters.chatglm2 import V2_SPEC
from adapters.family import CausalLM
from adapters.runtime.engine import Engine
from bench.common import (
    MODES,
    DecodeRates,
    add_model_arguments,
    build_model,
    machine_summary,
    markdown_table,
    shape_from_args,
)
from bench.speculative import make_local
from bench.workload import NO_EOS, load_tokenizer

logger = logging.getLogger("bench.prediction")

#: the text an editor sends: repeated with other names until it is long enough
CODE = '''def {name}(items, limit={n}):
    """Return the first {n} items that pass the check, sorted by key."""
    kept = []
    for item in items:
        if item.key is None or item.size > limit:
            continue
        kept.append(item)
    kept.sort(key=lambda item: (item.key, item.size))
    return kept[:{n}]

'''
NAMES = ("select", "pick_small", "first_valid", "shortlist", "top_items", "filter_sizes")


def code_text(tokenizer: object, tokens: int) -> str:
    text, i = "", 0
    while len(tokenizer.encode(text)) < tokens:  # type: ignore[attr-defined]
        text += CODE.format(name=NAMES[i % len(NAMES)], n=10 + 7 * i)
        i += 1
    return text


class Counting:
    """The model's forward calls, counted (the engine calls these two)."""

    def __init__(self, model: CausalLM) -> None:
        self.calls = 0
        for name in ("forward", "forward_batch"):
            inner = getattr(model, name)

            def counted(*args: object, _inner: object = inner, **kwargs: object) -> object:
                self.calls += 1
                return _inner(*args, **kwargs)  # type: ignore[operator]
            setattr(model, name, counted)


@dataclass(frozen=True)
class Run(DecodeRates):
    answer: tuple[int, ...]
    wall: float  # from the first token to the last
    cpu: float
    tokens: int  # generated after the first
    forwards: int
    usage: Usage


def run_once(engine: Engine, counter: Counting, prompt: Prompt) -> Run:
    first: list[tuple[float, float]] = []
    final: list[Delta] = []
    done = threading.Event()

    def deliver(delta: Delta) -> None:  # on the engine thread
        if not first:
            first.append((time.perf_counter(), time.process_time()))
        if delta.finish_reason is not None:
            final.append(delta)
            done.set()

    calls = counter.calls
    seq = engine.submit(prompt, deliver)
    done.wait()
    wall, cpu = time.perf_counter(), time.process_time()
    usage = final[0].usage
    assert usage is not None
    return Run(tuple(seq.generated), wall - first[0][0], cpu - first[0][1],
               len(seq.generated) - 1, counter.calls - calls, usage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default_preset="mid")
    parser.add_argument("--mode", choices=sorted(MODES), default="int4")
    parser.add_argument("--code-tokens", type=int, default=300)
    parser.add_argument("--answer-tokens", type=int, default=300)
    parser.add_argument("--edit-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "chatglm-gateway-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shape = shape_from_args(args)
    tokenizer = load_tokenizer(args.cache_dir)
    model = build_model(shape, args.mode)
    make_local(model)
    counter = Counting(model)
    code = code_text(tokenizer, args.code_tokens)
    request = "Repeat this code with `limit` renamed to `max_size` on its first line:\n\n" + code
    ids = tuple(tokenizer.encode(request))
    params = SamplingParams(temperature=0.0, max_tokens=args.answer_tokens, logit_bias=NO_EOS)
    engine = Engine(model, tokenizer, V2_SPEC, name="bench", prefix_cache=False)
    try:
        run_once(engine, counter, Prompt(tuple(tokenizer.encode("warm up")), params))
        answer = run_once(engine, counter, Prompt(ids, params)).answer
        middle = len(answer) // 2
        edit = tuple(tokenizer.encode("    kept = [item for item in items if item.key]\n"))
        prediction = answer[:middle] + edit[:args.edit_tokens] \
            + answer[middle + args.edit_tokens:]
        prompts = {"without": Prompt(ids, params),
                   "with prediction": Prompt(ids, params, prediction_ids=prediction)}
        best: dict[str, Run] = {}
        best_cpu: dict[str, Run] = {}
        pairs: list[tuple[float, float]] = []
        identical = True
        for r in range(args.repeats):
            order = list(prompts.items())
            runs = {}
            for name, prompt in order if r % 2 == 0 else order[::-1]:
                run = runs[name] = run_once(engine, counter, prompt)
                logger.info("repeat %d, %s: %.2f tok/s, %.2f tok per CPU-s, %d forwards",
                            r + 1, name, run.rate, run.cpu_rate, run.forwards)
                if name not in best or run.rate > best[name].rate:
                    best[name] = run
                if name not in best_cpu or run.cpu_rate > best_cpu[name].cpu_rate:
                    best_cpu[name] = run
            identical &= runs["without"].answer == runs["with prediction"].answer == answer
            pairs.append((runs["with prediction"].rate / runs["without"].rate,
                          runs["with prediction"].cpu_rate / runs["without"].cpu_rate))
    finally:
        engine.close()

    plain, fast = best["without"], best["with prediction"]
    details = fast.usage.completion_tokens_details
    accepted = f"{details.accepted_prediction_tokens} / {details.rejected_prediction_tokens}" \
        if details is not None else "-"
    print(f"\n{shape.describe()}; weights {args.mode}; {machine_summary()}; prompt of "
          f"{len(ids)} tokens (~{args.code_tokens} of code), answer of {len(answer)} tokens, "
          f"prediction of {len(prediction)} ({args.edit_tokens} ids replaced in the middle); "
          f"best of {args.repeats} alternating runs\n")
    print(markdown_table(
        ["without: tok/s", "with prediction: tok/s", "speed-up best/best", "median of paired",
         "CPU time best/best", "CPU median of paired", "forward passes without / with",
         "accepted / rejected prediction tokens", "same answers"],
        [[f"{plain.rate:.2f}", f"{fast.rate:.2f}", f"{fast.rate / plain.rate:.2f}x",
          f"{statistics.median(w for w, _ in pairs):.2f}x",
          f"{best_cpu['with prediction'].cpu_rate / best_cpu['without'].cpu_rate:.2f}x",
          f"{statistics.median(c for _, c in pairs):.2f}x",
          f"{plain.forwards} / {fast.forwards}", accepted, "yes" if identical else "NO"]]))


if __name__ == "__main__":
    main()
