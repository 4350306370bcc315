"""Decode tokens/s at several batch sizes and 512-token prefill tokens/s, per weight format.

    python -m bench.decode [--modes int4,int8,bf16] [--batches 1,4,8,16] [--layers N]
                           [--preset 6b|mid|v1-6b] [--compare-onednn]
                           [--prefill 512] [--prefill-repeats 2] [--no-int8-activations]

Each mode's model is built in memory (bench/common.py), measured, then freed before the next.
Decoding goes through the engine's own calls: ``model.forward`` for one sequence and
``model.forward_batch`` for several.  Every sequence's KV cache is first filled with ``--context``
random positions (written straight into the cache: prefilling 16 x 512 tokens would take longer
than the measurement and change nothing about a decode step).  Warm-up steps are excluded; each
figure is repeated and the best and median are printed, because other processes share the cores.
The prefill is measured exactly and, for int4/int8 weights where the kernels exist, with int8
activations (``--int8-activations``; every row count, as a prefill chunk takes it), the two
alternating within each repeat.
Prints a Markdown table; asserts nothing.

``--compare-onednn``: bf16 weights are timed twice in the same run, alternating repeat by repeat:
the four linears of every layer on the native kernel (the gateway's path) and on torch's
``nn.Linear`` (oneDNN, the path before it), both beside the bandwidth bound.  The two models exist
at once: pass ``--layers`` to fit memory.  ``--preset v1-6b`` builds ChatGLM-6B (v1) instead.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Callable

import torch

from adapters.chatglm.model import ChatGLMCache
from adapters.chatglm2.model import ChatGLM2Model
from adapters.runtime.kv_cache import KVCacheBase
from adapters.weights.activations import disable_int8_activations, enable_int8_activations
from bench.common import (
    ModelShape,
    Timing,
    add_model_arguments,
    build_model,
    machine_summary,
    markdown_table,
    memory_bandwidth,
    model_bytes,
    shape_from_args,
    timed,
    torch_linears,
    weight_bytes_per_token,
)

logger = logging.getLogger("bench.decode")


@torch.inference_mode()
def filled_cache(model: ChatGLM2Model, context: int, gen: torch.Generator) -> KVCacheBase:
    """A cache holding ``context`` random positions in every layer (for ChatGLM-6B: a context
    of that length with its [gMASK] last, so later positions are generated ones)."""
    cache = model.new_cache()
    if context == 0:
        return cache
    cache.reserve(context)
    layers, _, heads, _, head_dim = cache.storage.shape
    for layer in range(layers):
        kv = torch.randn(2, heads, context, head_dim, generator=gen).to(model.dtype)
        cache.write(layer, kv[0], kv[1])
    cache.commit(context)
    if isinstance(cache, ChatGLMCache):
        cache.context_length, cache.mask_position = context, context - 1
    return cache


def decode_run(model: ChatGLM2Model, batch: int, context: int, steps: int,
               gen: torch.Generator) -> Callable[[], None]:
    """``steps`` decode steps of ``batch`` sequences with ``context`` cached positions each."""
    caches = [filled_cache(model, context, gen) for _ in range(batch)]
    ids = [[int(i)] for i in torch.randint(3, 20000, (batch,), generator=gen)]

    def run() -> None:
        for _ in range(steps):
            if batch == 1:  # the engine decodes a lone sequence through forward
                model.forward(ids[0], caches[0])
            else:
                model.forward_batch(ids, caches)

    return run


def decode_timing(model: ChatGLM2Model, batch: int, context: int, steps: int, repeats: int,
                  gen: torch.Generator) -> Timing:
    """Seconds per decode step of ``batch`` sequences (``steps`` steps per run)."""
    # Each run appends ``steps`` positions: the context grows by a few percent, no more.
    t = timed(decode_run(model, batch, context, steps, gen), repeats, warmup=1)
    return Timing(tuple(r / steps for r in t.runs))


def alternating_timings(runs: list[Callable[[], None]], repeats: int,
                        steps: int) -> list[Timing]:
    """Seconds per step of each of ``runs``, timed in turn within every repeat (after one warm-up
    each), so that a change in the host's load hits them all alike."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            out.append((time.perf_counter() - start) / steps)
    return [Timing(tuple(t)) for t in times]


def prefill_timings(model: ChatGLM2Model, length: int, repeats: int, gen: torch.Generator,
                    variants: dict[str, Callable[[ChatGLM2Model], object]]) -> dict[str, Timing]:
    """Seconds to prefill ``length`` random ids, per variant (a function that switches the model
    to it), the variants alternating within each repeat so that they share the machine's noise."""
    ids = torch.randint(3, model.padded_vocab_size, (length,), generator=gen).tolist()
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for switch in variants.values():  # warm-up: first-call allocations, thread pool
        switch(model)
        model.forward(ids[:64], model.new_cache())
    for _ in range(repeats):
        for name, switch in variants.items():
            switch(model)
            cache = model.new_cache()
            start = time.perf_counter()
            model.forward(ids, cache)
            runs[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(r)) for name, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--modes", default="int4,int8,bf16")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--context", type=int, default=256,
                        help="positions already in each sequence's cache when decoding")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512, help="prompt length (0: skip)")
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument("--compare-onednn", action="store_true",
                        help="bf16: time the native linears and oneDNN's side by side")
    parser.add_argument("--no-int8-activations", dest="int8_activations", action="store_false",
                        help="skip the int8-activation prefill (measured beside the exact one "
                        "for int4/int8 weights where AVX512-VNNI is available)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shape: ModelShape = shape_from_args(args)
    batches = [int(b) for b in args.batches.split(",")]
    logger.info("%s; %s", shape.describe(), machine_summary())
    bandwidth = memory_bandwidth()
    logger.info("memory bandwidth (torch.sum over 1 GiB fp32, best of 7): %.1f GB/s", bandwidth)

    rows = []
    for mode in args.modes.split(","):
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        model = build_model(shape, mode)
        per_token = weight_bytes_per_token(model)
        bound = bandwidth * 1e9 / per_token
        logger.info("%s: built in %.0f s, %.2f GB in memory, %.2f GB read per token, bound %.2f "
                    "tok/s", mode, time.perf_counter() - start, model_bytes(model) / 1e9,
                    per_token / 1e9, bound)
        twin = None
        if args.compare_onednn and mode == "bf16":
            twin = build_model(shape, mode)
            logger.info("bf16 twin on oneDNN: %d linears", torch_linears(twin))
        for batch in batches:
            if twin is None:
                timings = {mode: decode_timing(model, batch, args.context, args.steps,
                                               args.repeats, gen)}
            else:
                native_t, onednn_t = alternating_timings(
                    [decode_run(m, batch, args.context, args.steps, gen) for m in (model, twin)],
                    args.repeats, args.steps)
                timings = {"bf16 native": native_t, "bf16 oneDNN": onednn_t}
            for label, t in timings.items():
                best, median = batch / t.best, batch / t.median
                logger.info("%s decode batch %d: %.2f tok/s best, %.2f median", label, batch,
                            best, median)
                rows.append([label, f"decode b={batch}", f"{best:.2f}", f"{median:.2f}",
                             f"{bound:.2f}" if batch == 1 else "", f"{best / bound:.0%}"
                             if batch == 1 else f"{best / bound:.2f}x bound"])
        if args.prefill:
            variants: dict[str, Callable[[ChatGLM2Model], object]] = {
                "exact": disable_int8_activations}
            if args.int8_activations and enable_int8_activations(model):
                variants["int8 activations"] = enable_int8_activations
            timings = prefill_timings(model, args.prefill, args.prefill_repeats, gen, variants)
            disable_int8_activations(model)
            exact = timings["exact"]
            for name, t in timings.items():
                logger.info("%s prefill %d (%s): %.1f tok/s best, %.1f median", mode,
                            args.prefill, name, args.prefill / t.best, args.prefill / t.median)
                rows.append([mode, f"prefill {args.prefill}" + ("" if name == "exact" else
                                                                f", {name}"),
                             f"{args.prefill / t.best:.1f}", f"{args.prefill / t.median:.1f}", "",
                             "" if name == "exact" else
                             f"{exact.best / t.best:.2f}x exact (median "
                             f"{exact.median / t.median:.2f}x)"])
        del model, twin
        gc.collect()

    print(f"\n{shape.describe()}; {machine_summary()}; bandwidth {bandwidth:.1f} GB/s; "
          f"decode context {args.context}, {args.steps} steps x {args.repeats} runs\n")
    print(markdown_table(["weights", "phase", "tok/s best", "tok/s median",
                          "bandwidth bound tok/s", "best / bound"], rows))


if __name__ == "__main__":
    main()
