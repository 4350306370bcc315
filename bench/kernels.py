"""Per-linear kernel choice: fused weight-only kernels vs "dequantise to bf16 once + one GEMM".

    python -m bench.kernels [--rows 1,4,8,16,32,64,128,512] [--shapes 6b] [--modes int4,int8]

For each of ChatGLM2-6B's four linear shapes and each number of activation rows (1 = batch-1
decode, 8 = eight streams, 512 = a prefill chunk) it times, on bf16 activations:

* ``kernel``: the layer's fused path (``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm``),
* ``dequant+gemm``: the layer's bf16 copy of the weight + one GEMM (what ``forward`` does from
  ``adapters.quant.DEQUANT_MIN_ROWS`` rows on),
* ``bf16 gemm``: a plain bf16 ``nn.Linear`` (the bf16 model; the floor the dequant path tends to),

and prints the best of ``--repeats`` in milliseconds, summed over the four shapes (one layer), so
the crossover row count can be read off.  Asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable

import torch

from adapters.quant import quantize_weight
from bench.common import PRESETS, machine_summary, markdown_table, timed

logger = logging.getLogger("bench.kernels")


def best(fn: Callable[..., object], *args: object, repeats: int) -> float:
    return timed(functools.partial(fn, *args), repeats).best


def linear_shapes(preset: str) -> list[tuple[int, int]]:
    """``(out, in)`` of query_key_value, dense, dense_h_to_4h and dense_4h_to_h."""
    c = PRESETS[preset]
    qkv = c.num_attention_heads * c.kv_channels + 2 * c.multi_query_group_num * c.kv_channels
    return [(qkv, c.hidden_size), (c.hidden_size, c.num_attention_heads * c.kv_channels),
            (2 * c.ffn_hidden_size, c.hidden_size), (c.hidden_size, c.ffn_hidden_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,8,16,32,64,128,512")
    parser.add_argument("--shapes", choices=sorted(PRESETS), default="6b")
    parser.add_argument("--modes", default="int4,int8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows_list = [int(r) for r in args.rows.split(",")]
    shapes = linear_shapes(args.shapes)
    mode_arg = {"int4": "4", "int8": "8"}
    gen = torch.Generator().manual_seed(0)
    table = []
    for mode in args.modes.split(","):
        layers = []
        for out_f, in_f in shapes:
            w = torch.empty(out_f, in_f, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            layers.append((quantize_weight(w, mode_arg[mode], kernel=True), w))
        dequant = sum(best(q._dequant_matmul, torch.zeros(1, q.k_pad, dtype=torch.bfloat16),
                           repeats=args.repeats) for q, _ in layers)
        logger.info("%s: dequantising one layer (+ a 1-row GEMM) %.1f ms", mode, dequant * 1e3)
        for rows in rows_list:
            kernel = fused = plain = 0.0
            for q, w in layers:
                x = torch.randn(rows, q.k_pad, generator=gen).to(torch.bfloat16)
                kernel += best(q._kernel_matmul, x, repeats=args.repeats)
                fused += best(q._dequant_matmul, x, repeats=args.repeats)
                plain += best(torch.nn.functional.linear, x[:, : w.shape[1]], w,
                              repeats=args.repeats)
            logger.info("%s rows %d: kernel %.1f ms, dequant+gemm %.1f ms, bf16 %.1f ms", mode,
                        rows, kernel * 1e3, fused * 1e3, plain * 1e3)
            table.append([mode, str(rows), f"{kernel * 1e3:.1f}", f"{fused * 1e3:.1f}",
                          f"{plain * 1e3:.1f}", "dequant+gemm" if fused < kernel else "kernel"])
        del layers
    print(f"\none {args.shapes} layer (4 linears), ms, best of {args.repeats}; "
          f"{machine_summary()}\n")
    print(markdown_table(["weights", "rows", "kernel", "dequant+gemm", "bf16 gemm", "faster"],
                         table))


if __name__ == "__main__":
    main()
