"""Per-layer time of the exact native kernel vs the int8-activation kernel, by activation rows.

    python -m bench.int8_kernels [--rows 1,8,16,32,64,512] [--modes int4,int8] [--repeats 5]

For ChatGLM2-6B's four linear shapes (one layer) and each number of activation rows it times the
layer's exact weight-only call (``adapters/weights/native``, bf16 activations, VDPBF16PS) and the
int8-activation call (quantising the rows + the VNNI GEMM, what ``--int8-activations`` does from
``adapters.weights.activations.MIN_ROWS`` rows on), alternating the two within each repeat.
Prints best and median milliseconds summed over the four linears; asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from adapters.weights import native
from adapters.weights.activations import Int8Activations
from adapters.weights.layers import quantize_weight
from adapters.weights.native import int8_act
from bench.common import PRESETS, machine_summary, markdown_table
from bench.kernels import linear_shapes

logger = logging.getLogger("bench.int8_kernels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8,16,32,64,512")
    parser.add_argument("--shapes", choices=sorted(PRESETS), default="6b")
    parser.add_argument("--modes", default="int4,int8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if native.library() is None or int8_act.library() is None:
        raise SystemExit("the native / int8-activation kernels are unavailable on this machine")
    gen = torch.Generator().manual_seed(0)
    table = []
    for mode in args.modes.split(","):
        layers = []
        for out_f, in_f in linear_shapes(args.shapes):
            w = torch.empty(out_f, in_f, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            layer = quantize_weight(w, mode.removeprefix("int"), native_kernel=True)
            layers.append((layer, Int8Activations(layer, 1)))
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = [torch.randn(rows, layer.in_features, generator=gen).to(torch.bfloat16)
                      for layer, _ in layers]
            runs: dict[str, list[float]] = {"exact": [], "int8": []}
            for repeat in range(args.repeats + 1):  # the first is a warm-up
                for name in runs:
                    start = time.perf_counter()
                    for (layer, int8), x in zip(layers, inputs, strict=True):
                        layer(x) if name == "exact" else int8(x)
                    if repeat:
                        runs[name].append(time.perf_counter() - start)
            exact, int8 = (min(runs[n]) * 1e3 for n in ("exact", "int8"))
            medians = [statistics.median(runs[n]) * 1e3 for n in ("exact", "int8")]
            logger.info("%s rows %d: exact %.1f ms, int8 activations %.1f ms", mode, rows, exact,
                        int8)
            table.append([mode, str(rows), f"{exact:.1f}", f"{int8:.1f}",
                          f"{exact / int8:.2f}x", f"{medians[0]:.1f} / {medians[1]:.1f}"])
    print(f"\none {args.shapes} layer (4 linears), ms, best of {args.repeats}; "
          f"{machine_summary()}\n")
    print(markdown_table(["weights", "rows", "exact (bf16 dot products)", "int8 activations",
                          "speed-up (best)", "medians exact / int8"], table))


if __name__ == "__main__":
    main()
