"""Speculative decoding by prompt lookup: decode tok/s with and without it, alternating, in one
run.

    python -m bench.speculative [--preset mid|6b] [--mode int4] [--streams 1,4] [--max-tokens 64]
                                [--threads N] [--k 4]

One random in-memory model (bench/common.py; int4 by default: decoding is memory-bound, so
checking several tokens per weight pass costs less than several passes) runs under two engines,
the gateway's own: a plain one and one with ``SpeculativeConfig`` (``--k`` draft ids, n-grams
``--ngram-min``..``--ngram-max``).  For each workload and number of concurrent streams the two
run the same requests in turn (which goes first alternates), ``--repeats`` times (each idles
while the other runs), and the script prints the best decode tok/s of each (tokens generated
after every stream has its first one, so prefill is left out), the speed-up in wall time and in
this process's CPU time (the host is shared: CPU time is what other processes' load stretches
least), best against best and the median of the repeats' paired ratios, the drafts' acceptance
rate, and whether every answer was identical.

The model's layers read no context (:func:`make_local`: a bigram model, same weights' cost): a
random model's answer otherwise changes chaotically with any change of its prompt, so no prompt
could contain what it will answer.  Workloads:

* **copy** (copy-heavy, greedy): the prompt is ``P + A + P``, where ``A`` is the greedy answer to
  ``P``: the answer quotes the prompt, as a RAG answer or a code edit does, and the drafts
  (what followed ``P``'s last tokens earlier) are right.
* **free**: sampled text from ``P`` (temperature 0.8, top_p 0.95, a fixed seed per stream),
  which almost never repeats: drafting finds little and switches itself off.

Eos is banned so every stream runs to ``--max-tokens``; prompts differ per stream.

Then the cost of verification: one forward of ``1 + k`` ids per sequence (``forward_batch`` with
``every_position``) vs the plain one-id step, alternating call by call, at 1 and 4 sequences, in
wall and CPU time, per step and per layer (step / layers).  Asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.base import Delta, Prompt, SamplingParams
from adapters.chatglm2 import V2_SPEC
from adapters.chatglm2.model import ChatGLM2Model, GLMBlock
from adapters.runtime.engine import Engine, Sequence
from adapters.runtime.speculative import SpeculativeConfig
from bench.common import (
    MODES,
    DecodeRates,
    add_model_arguments,
    build_model,
    machine_summary,
    markdown_table,
    shape_from_args,
)
from bench.decode import filled_cache
from bench.workload import NO_EOS, load_tokenizer, user_text

logger = logging.getLogger("bench.speculative")

#: sampling settings per workload (eos is banned in all); the prompts are chosen in main()
WORKLOADS: dict[str, dict[str, Any]] = {
    "copy": {"temperature": 0.0},
    "free": {"temperature": 0.8, "top_p": 0.95},
    # random text over 32 favoured ids: its n-grams recur all the time, yet a draft is right
    # about 1 time in 32: the case the switch-off is for
    "repetitive": {"temperature": 1.0,
                   "logit_bias": tuple((1000 + 97 * i, 12.0) for i in range(32))},
}


@dataclass(frozen=True)
class Run(DecodeRates):
    """One run: its answers, and the decode window: from the moment every stream has its first
    token (prefill done) to the end, in wall and CPU time, and the tokens generated in it."""

    answers: tuple[tuple[int, ...], ...]
    wall: float
    cpu: float  # CPU seconds of this process (every thread): what the host's load cannot stretch
    tokens: int
    drafted: int
    accepted: int


def run_once(engine: Engine, prompts: list[tuple[int, ...]], workload: str,
             max_tokens: int) -> Run:
    """All ``prompts`` at once through ``engine``."""
    before = engine.counts()
    finished = threading.Semaphore(0)
    seqs: list[Sequence] = []
    started: set[int] = set()
    window: list[tuple[float, float, int]] = []  # (wall, cpu, tokens so far) once all started

    def deliver_for(i: int) -> Callable[[Delta], None]:
        def deliver(delta: Delta) -> None:  # on the engine thread
            if i not in started:
                started.add(i)
                if len(started) == len(prompts) and len(seqs) == len(prompts):
                    window.append((time.perf_counter(), time.process_time(),
                                   sum(len(s.generated) for s in seqs)))
            if delta.finish_reason is not None:
                finished.release()
        return deliver

    for i, ids in enumerate(prompts):
        options = dict(WORKLOADS[workload])
        options["logit_bias"] = NO_EOS + tuple(options.get("logit_bias", ()))
        params = SamplingParams(max_tokens=max_tokens, seed=100 + i, **options)
        seqs.append(engine.submit(Prompt(ids, params), deliver_for(i)))
    for _ in seqs:
        finished.acquire()
    wall, cpu = time.perf_counter(), time.process_time()
    if not window:
        raise RuntimeError("a stream finished before the others started: raise --max-tokens")
    t0, c0, g0 = window[0]
    after = engine.counts()
    answers = tuple(tuple(s.generated) for s in seqs)
    return Run(answers, wall - t0, cpu - c0, sum(len(a) for a in answers) - g0,
               after.get("speculative_drafted", 0) - before.get("speculative_drafted", 0),
               after.get("speculative_accepted", 0) - before.get("speculative_accepted", 0))


def make_local(model: ChatGLM2Model) -> None:
    """Zero every layer's input norm: attention then reads only its biases, so it adds the same
    vector at every position and the next token depends on the current one alone (a bigram
    model).  Its greedy answer to a prompt that ends as an earlier passage did is what followed
    that passage, as a trained model quoting its prompt does.  Every kernel does the same work
    (the values of weights and activations do not change a decode step's cost)."""
    for module in model.modules():
        if isinstance(module, GLMBlock):
            with torch.no_grad():
                module.input_layernorm.weight.zero_()


@torch.inference_mode()
def verify_cost(model: ChatGLM2Model, batch: int, k: int, context: int, repeats: int
                ) -> dict[str, float]:
    """Best-of-``repeats`` seconds, alternating call by call, of: one decode step of ``batch``
    sequences feeding 1 id each (``plain``) and ``1 + k`` ids each with every position's logits
    (``verify``), in wall and CPU time (``*_cpu``); and of the output layer alone on the rows of
    each (``out_plain``, ``out_verify``), to tell the layers' share from the output layer's."""
    gen = torch.Generator().manual_seed(0)
    caches = [filled_cache(model, context, gen) for _ in range(batch)]
    vocab = model.config.padded_vocab_size
    one = [[int(torch.randint(3, vocab, (1,), generator=gen))] for _ in range(batch)]
    several = [ids + [int(t) for t in torch.randint(3, vocab, (k,), generator=gen)]
               for ids in one]
    hidden = model.config.hidden_size
    out = model.transformer.output_layer
    h_one = torch.randn(batch, 1, hidden, generator=gen).to(model.dtype)
    h_several = torch.randn(batch * (1 + k), 1, hidden, generator=gen).to(model.dtype)

    def plain() -> None:
        if batch == 1:
            model.forward(one[0], caches[0])
        else:
            model.forward_batch(one, caches)
        for c in caches:
            c.truncate(context)

    def verify() -> None:
        model.forward_batch(several, caches, every_position=True)
        for c in caches:
            c.truncate(context)

    calls = {"plain": plain, "verify": verify, "out_plain": lambda: out(h_one),
             "out_verify": lambda: out(h_several)}
    for fn in calls.values():  # warm-up of every shape
        fn()
    best = {name: float("inf") for name in calls} | {
        f"{name}_cpu": float("inf") for name in calls}
    for _ in range(repeats):  # alternating call by call: the host's noise hits all alike
        for name, fn in calls.items():
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
            best[f"{name}_cpu"] = min(best[f"{name}_cpu"], time.process_time() - cpu)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default_preset="mid")
    parser.add_argument("--mode", choices=sorted(MODES), default="int4")
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--workloads", default="copy,free,repetitive")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=SpeculativeConfig.num_speculative_tokens)
    parser.add_argument("--ngram-max", type=int, default=SpeculativeConfig.prompt_lookup_max)
    parser.add_argument("--ngram-min", type=int, default=SpeculativeConfig.prompt_lookup_min)
    parser.add_argument("--context", type=int, default=256,
                        help="cached positions for the verification-cost figures")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "chatglm-gateway-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shape = shape_from_args(args)
    config = SpeculativeConfig(num_speculative_tokens=args.k, prompt_lookup_max=args.ngram_max,
                               prompt_lookup_min=args.ngram_min)
    tokenizer = load_tokenizer(args.cache_dir)
    model = build_model(shape, args.mode)
    make_local(model)
    streams = [int(s) for s in args.streams.split(",")]
    engines = {name: Engine(model, tokenizer, V2_SPEC, name=name, prefix_cache=False,
                            max_running=max(streams), speculative=speculative)
               for name, speculative in (("plain", None), ("speculative", config))}
    rows = []
    try:
        for engine in engines.values():  # warm-up: first-call allocations, thread pools, kernels
            run_once(engine, [tuple(tokenizer.encode("warm up"))], "copy", 4)
        users = [tuple(tokenizer.encode(user_text(tokenizer, args.prompt_tokens, 7 * i)))
                 for i in range(max(streams))]
        workloads = [w for w in args.workloads.split(",") if w]
        copies = users
        if "copy" in workloads:
            # the prompt, the answer plain greedy decoding gives to it, the prompt again
            answers = run_once(engines["plain"], users, "copy", args.max_tokens).answers
            copies = [p + a + p for p, a in zip(users, answers, strict=True)]
        for workload in workloads:
            for n in streams:
                prompts = (copies if workload == "copy" else users)[:n]
                best: dict[str, Run] = {}
                best_cpu: dict[str, Run] = {}
                pairs: list[tuple[float, float]] = []  # (wall, CPU) speed-up of each repeat
                identical = True
                for r in range(args.repeats):
                    outputs, runs = {}, {}
                    order = list(engines.items())
                    for name, engine in order if r % 2 == 0 else order[::-1]:
                        run = run_once(engine, prompts, workload, args.max_tokens)
                        outputs[name] = run.answers
                        logger.info("%s %d streams, repeat %d, %s: %.2f tok/s, %.2f tok per "
                                    "CPU-s (%d/%d drafts accepted)", workload, n, r + 1, name,
                                    run.rate, run.cpu_rate, run.accepted, run.drafted)
                        if name not in best or run.rate > best[name].rate:
                            best[name] = run
                        if name not in best_cpu or run.cpu_rate > best_cpu[name].cpu_rate:
                            best_cpu[name] = run
                        runs[name] = run
                    identical &= outputs["plain"] == outputs["speculative"]
                    pairs.append((runs["speculative"].rate / runs["plain"].rate,
                                  runs["speculative"].cpu_rate / runs["plain"].cpu_rate))
                plain, spec = best["plain"], best["speculative"]
                acceptance = f"{spec.accepted / spec.drafted:.0%}" if spec.drafted else "-"
                cpu_gain = best_cpu["speculative"].cpu_rate / best_cpu["plain"].cpu_rate
                median = statistics.median(w for w, _ in pairs)
                median_cpu = statistics.median(c for _, c in pairs)
                rows.append([workload, str(n), f"{plain.rate:.2f}", f"{spec.rate:.2f}",
                             f"{spec.rate / plain.rate:.2f}x", f"{median:.2f}x",
                             f"{cpu_gain:.2f}x", f"{median_cpu:.2f}x", acceptance,
                             f"{spec.drafted / sum(len(a) for a in spec.answers):.2f}",
                             "yes" if identical else "NO"])
    finally:
        for engine in engines.values():
            engine.close()

    costs = []
    layers = shape.config.num_layers
    for batch in streams:
        t = verify_cost(model, batch, args.k, args.context, 4 * args.repeats)
        per_layer = [(t[step] - t[f"out_{step}"]) / layers for step in ("plain", "verify")]
        costs.append([str(batch), f"{t['plain'] * 1e3:.1f}", f"{t['verify'] * 1e3:.1f}",
                      f"{t['verify'] / t['plain']:.2f}x",
                      f"{t['verify_cpu'] / t['plain_cpu']:.2f}x",
                      f"{per_layer[0] * 1e3:.2f}", f"{per_layer[1] * 1e3:.2f}",
                      f"{per_layer[1] / per_layer[0]:.2f}x",
                      f"{t['out_verify'] / t['out_plain']:.2f}x"])

    print(f"\n{shape.describe()}; weights {args.mode}; {machine_summary()}; prompts of "
          f"~{args.prompt_tokens} tokens, answers of {args.max_tokens} tokens; k={args.k}, "
          f"n-grams {args.ngram_min}..{args.ngram_max}; best of {args.repeats} alternating "
          "runs\n")
    print(markdown_table(["workload", "streams", "plain tok/s", "speculative tok/s",
                          "speed-up (best / best)", "median of paired", "CPU time: best / best",
                          "median of paired", "drafts accepted", "drafted per token",
                          "same answers"], rows))
    print(f"\nverification cost: a step feeding 1 id per sequence vs {1 + args.k} (context "
          f"{args.context}; best of {4 * args.repeats} alternating calls); per layer = (step - "
          "output layer alone) / layers\n")
    k1 = 1 + args.k
    print(markdown_table(["sequences", "1 id: step ms", f"{k1} ids: step ms", "step ratio",
                          "step ratio, CPU time", "1 id: ms per layer",
                          f"{k1} ids: ms per layer", "layer ratio", "output layer ratio"],
                         costs))


if __name__ == "__main__":
    main()
