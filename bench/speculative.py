"""Speculative decoding by prompt lookup: decode tok/s with and without it, alternating, in one
run.

    python -m bench.speculative [--preset mid|6b] [--mode int4] [--streams 1,4] [--max-tokens 64]
                                [--threads N] [--k 4]

One random in-memory model (bench/common.py; int4 by default: decoding is memory-bound, so
checking several tokens per weight pass costs less than several passes) runs under two engines,
the gateway's own: a plain one and one with ``SpeculativeConfig`` (``--k`` draft ids, n-grams
``--ngram-min``..``--ngram-max``).  For each workload and number of concurrent streams the two
run the same requests in turn, ``--repeats`` times (each idles while the other runs), and the
script prints the best decode tok/s of each (tokens generated after every stream has its first
one, so prefill is left out), the speed-up in wall time and in this process's CPU time (the host
is shared: CPU time is what other processes' load stretches least), the drafts' acceptance rate,
and whether every answer was identical.

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
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.base import Delta, Prompt, SamplingParams
from adapters.chatglm2 import V2_SPEC
from adapters.chatglm2.model import ChatGLM2Model, GLMBlock
from adapters.runtime.engine import Engine, Sequence
from adapters.runtime.speculative import SpeculativeConfig
from bench.common import (
    MODES,
    add_model_arguments,
    build_model,
    machine_summary,
    markdown_table,
    shape_from_args,
)
from bench.decode import filled_cache
from bench.workload import NO_EOS, load_tokenizer, user_text

logger = logging.getLogger("bench.speculative")

WORKLOADS = {
    "copy": {"temperature": 0.0},
    "free": {"temperature": 0.8, "top_p": 0.95},
}


@dataclass(frozen=True)
class Run:
    """One run: its answers, and the decode window: from the moment every stream has its first
    token (prefill done) to the end, in wall and CPU time, and the tokens generated in it."""

    answers: tuple[tuple[int, ...], ...]
    wall: float
    cpu: float  # CPU seconds of this process (every thread): what the host's load cannot stretch
    tokens: int
    drafted: int
    accepted: int

    @property
    def rate(self) -> float:
        return self.tokens / self.wall

    @property
    def cpu_rate(self) -> float:
        return self.tokens / self.cpu


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
        params = SamplingParams(max_tokens=max_tokens, logit_bias=NO_EOS, seed=100 + i,
                                **WORKLOADS[workload])  # type: ignore[arg-type]
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
                ) -> tuple[float, float, float, float]:
    """Seconds of one decode step of ``batch`` sequences feeding 1 id each vs ``1 + k`` ids
    each (every position's logits), alternating; best of ``repeats``, in wall time and in CPU
    time (both threads)."""
    gen = torch.Generator().manual_seed(0)
    caches = [filled_cache(model, context, gen) for _ in range(batch)]
    vocab = model.config.padded_vocab_size
    one = [[int(torch.randint(3, vocab, (1,), generator=gen))] for _ in range(batch)]
    several = [ids + [int(t) for t in torch.randint(3, vocab, (k,), generator=gen)]
               for ids in one]

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

    plain()  # warm-up of both shapes
    verify()
    walls: dict[str, list[float]] = {"plain": [], "verify": []}
    cpus: dict[str, list[float]] = {"plain": [], "verify": []}
    for _ in range(repeats):  # alternating call by call: the host's noise hits both alike
        for name, fn in (("plain", plain), ("verify", verify)):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(time.process_time() - cpu)
    return (min(walls["plain"]), min(walls["verify"]), min(cpus["plain"]),
            min(cpus["verify"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, default_preset="mid")
    parser.add_argument("--mode", choices=sorted(MODES), default="int4")
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--workloads", default="copy,free")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
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
                identical = True
                for r in range(args.repeats):
                    outputs = {}
                    for name, engine in engines.items():
                        run = run_once(engine, prompts, workload, args.max_tokens)
                        outputs[name] = run.answers
                        logger.info("%s %d streams, repeat %d, %s: %.2f tok/s, %.2f tok per "
                                    "CPU-s (%d/%d drafts accepted)", workload, n, r + 1, name,
                                    run.rate, run.cpu_rate, run.accepted, run.drafted)
                        if name not in best or run.rate > best[name].rate:
                            best[name] = run
                        if name not in best_cpu or run.cpu_rate > best_cpu[name].cpu_rate:
                            best_cpu[name] = run
                    identical &= outputs["plain"] == outputs["speculative"]
                plain, spec = best["plain"], best["speculative"]
                acceptance = f"{spec.accepted / spec.drafted:.0%}" if spec.drafted else "-"
                cpu_gain = best_cpu["speculative"].cpu_rate / best_cpu["plain"].cpu_rate
                rows.append([workload, str(n), f"{plain.rate:.2f}", f"{spec.rate:.2f}",
                             f"{spec.rate / plain.rate:.2f}x", f"{cpu_gain:.2f}x", acceptance,
                             f"{spec.drafted / sum(len(a) for a in spec.answers):.2f}",
                             "yes" if identical else "NO"])
    finally:
        for engine in engines.values():
            engine.close()

    costs = []
    layers = shape.config.num_layers
    for batch in streams:
        one, several, one_cpu, several_cpu = verify_cost(model, batch, args.k, args.context,
                                                         4 * args.repeats)
        costs.append([str(batch), f"{one * 1e3:.1f}", f"{several * 1e3:.1f}",
                      f"{several / one:.2f}x", f"{several_cpu / one_cpu:.2f}x",
                      f"{one * 1e3 / layers:.2f}", f"{several * 1e3 / layers:.2f}"])

    print(f"\n{shape.describe()}; weights {args.mode}; {machine_summary()}; prompts of "
          f"~{args.prompt_tokens} tokens, answers of {args.max_tokens} tokens; k={args.k}, "
          f"n-grams {args.ngram_min}..{args.ngram_max}; best of {args.repeats} alternating "
          "runs\n")
    print(markdown_table(["workload", "streams", "plain tok/s", "speculative tok/s", "speed-up",
                          "speed-up in CPU time", "drafts accepted", "drafted per token", "same answers"], rows))
    print(f"\nverification cost (context {args.context}; whole step incl. the output layer, "
          "and per layer = step / layers):\n")
    print(markdown_table(["sequences", "1 id ms", f"{1 + args.k} ids ms", "ratio",
                          "ratio in CPU time",
                          "1 id ms/layer", f"{1 + args.k} ids ms/layer"], costs))


if __name__ == "__main__":
    main()
