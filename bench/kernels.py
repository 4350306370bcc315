"""Per-linear kernel choice: fused weight-only kernels vs "dequantise to bf16 once + one GEMM".

    python -m bench.kernels [--rows 1,4,8,16,32,64,128,512] [--shapes 6b] [--modes int4,int8,bf16]

For each of ChatGLM2-6B's four linear shapes and each number of activation rows (1 = batch-1
decode, 8 = eight streams, 512 = a prefill chunk) it times, on bf16 activations:

* ``native``: the gateway's own kernel (``adapters/weights/native``; "-" where it cannot be built),
* ``torch kernel``: torch's fused kernel (``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm``),
* ``dequant+gemm``: a bf16 copy of the weight + one GEMM (what ``forward`` does from the layer's
  ``dequant_min_rows`` on: torch-kernel layers ``adapters.weights.layers.DEQUANT_MIN_ROWS``, native layers
  ``adapters.weights.native.DEQUANT_MIN_ROWS``),
* ``bf16 gemm``: a plain bf16 ``nn.Linear`` (the bf16 model; the floor the dequant path tends to),

and prints the best of ``--repeats`` in milliseconds, summed over the four shapes (one layer), so
the crossover row count can be read off.  ``bf16`` weights: ``native`` is the native bf16 linear
(what a bf16 model's layers run on) and ``torch kernel`` oneDNN's ``nn.functional.linear``.

``--attention`` instead times one decode step's attention per layer (one query per sequence over
``L`` cached positions, 32 heads over 2 KV groups, bf16): ``scaled_dot_product_attention`` with
``enable_gqa`` and a padding mask vs :func:`adapters.chatglm2.model.decode_attention` (torch, on a
padded batch) vs ``adapters.weights.native.decode_attention`` (each sequence's cache read in place; the
model's path in bf16 on a CPU with the kernels).  Asserts nothing.

``--prefill-attention`` times one layer's attention for a prefill chunk of ``T`` new positions
after ``L`` cached ones (a chat's next turn: ``208 @ 1950`` is turn 10 of ``bench.affinity``):
``adapters.weights.native.prefill_attention`` (the model's path) vs SDPA with the causal mask, and,
with ``--baseline-source FILE`` (e.g. ``git show REV:adapters/weights/native/wq_gemm.c > old.c``),
the same call on a library built from that older source, alternating with the new one; also
the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from adapters.chatglm2.model import decode_attention
from adapters.weights import native
from adapters.weights.layers import quantize_weight
from bench.common import PRESETS, machine_summary, markdown_table, timed

logger = logging.getLogger("bench.kernels")


def best(fn: Callable[..., object], *args: object, repeats: int, **kwargs: object) -> float:
    return timed(functools.partial(fn, *args, **kwargs), repeats).best


def linear_shapes(preset: str) -> list[tuple[int, int]]:
    """``(out, in)`` of query_key_value, dense, dense_h_to_4h and dense_4h_to_h."""
    c = PRESETS[preset]
    qkv = c.num_attention_heads * c.kv_channels + 2 * c.multi_query_group_num * c.kv_channels
    return [(qkv, c.hidden_size), (c.hidden_size, c.num_attention_heads * c.kv_channels),
            (2 * c.ffn_hidden_size, c.hidden_size), (c.hidden_size, c.ffn_hidden_size)]


def attention_table(preset: str, repeats: int) -> None:
    c = PRESETS[preset]
    heads, groups, hd = c.num_attention_heads, c.multi_query_group_num, c.kv_channels
    gen = torch.Generator().manual_seed(0)
    table = []
    for batch, length in ((1, 256), (1, 2048), (8, 512), (16, 512)):
        q = torch.randn(batch, 1, heads, hd, generator=gen).to(torch.bfloat16)
        k, v = torch.randn(2, batch, groups, length, hd, generator=gen).to(torch.bfloat16)
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        sdpa = best(torch.nn.functional.scaled_dot_product_attention, q.transpose(1, 2), k, v,
                    mask, repeats=repeats, enable_gqa=True)
        grouped = best(decode_attention, q, k, v, mask, repeats=repeats)
        in_place = "-"
        lib = native.library()
        if lib is not None:  # each sequence's own cache storage, read in place
            storages = [torch.cat([k[i:i + 1], v[i:i + 1]]).unsqueeze(0).contiguous()
                        for i in range(batch)]  # [1 layer, 2, groups, length, hd]
            dbatch = native.DecodeBatch(storages, [length] * batch)
            new_kv = torch.randn(2, batch, 1, groups, hd, generator=gen).to(torch.bfloat16)
            t = best(native.decode_attention, lib, dbatch, 0, q, new_kv[0], new_kv[1],
                     repeats=repeats)
            in_place = f"{t * 1e3:.2f}"
        table.append([str(batch), str(length), f"{sdpa * 1e3:.2f}", f"{grouped * 1e3:.2f}",
                      in_place])
    print(f"\ndecode attention, one {preset} layer, bf16, ms, best of {repeats}; "
          f"{machine_summary()}\n")
    print(markdown_table(["batch", "cached positions", "SDPA (enable_gqa)", "decode_attention",
                          "native (in place)"], table))


def prefill_attention_table(preset: str, repeats: int, baseline: Path | None) -> None:
    c = PRESETS[preset]
    heads, groups, hd = c.num_attention_heads, c.multi_query_group_num, c.kv_channels
    lib = native.library()
    if lib is None:
        raise SystemExit("the native kernels are not available on this machine")
    old = native.library_from(baseline) if baseline is not None else None
    gen = torch.Generator().manual_seed(0)
    table = []
    for new, cached in ((161, 12), (208, 1950), (512, 0), (512, 3584)):
        total = cached + new
        storage = torch.randn(1, 2, groups, total, hd, generator=gen).to(torch.bfloat16)
        q = torch.randn(new, heads, hd, generator=gen).to(torch.bfloat16)
        lens = torch.arange(cached + 1, total + 1, dtype=torch.int64)
        scores = new * heads * (cached + (new + 1) / 2)  # query-key pairs attended
        mask = torch.arange(total)[None, :] < lens[:, None]
        sdpa = best(torch.nn.functional.scaled_dot_product_attention, q.transpose(0, 1)[None],
                    storage[:, 0], storage[:, 1], mask, repeats=repeats, enable_gqa=True)
        mine, before = [], []
        for _ in range(repeats):  # alternating, so both see the same host
            mine.append(best(native.prefill_attention, lib, storage, 0, q, lens, repeats=1))
            if old is not None:
                before.append(best(native.prefill_attention, old, storage, 0, q, lens,
                                   repeats=1))
        row = [str(new), str(cached), f"{sdpa * 1e3:.1f}", f"{min(mine) * 1e3:.1f}",
               f"{min(mine) / scores * 1e9:.2f}"]
        if old is not None:
            diff = (native.prefill_attention(lib, storage, 0, q, lens).float()
                    - native.prefill_attention(old, storage, 0, q, lens).float()).abs().max()
            row += [f"{min(before) * 1e3:.1f}", f"{min(before) / min(mine):.2f}x",
                    f"{float(diff):.2g}"]
        table.append(row)
    print(f"\nprefill attention, one {preset} layer ({heads} heads, {groups} KV groups, "
          f"head size {hd}), bf16, ms, best of {repeats}, {torch.get_num_threads()} threads; "
          f"{machine_summary()}\n")
    head = ["new positions", "cached positions", "SDPA (causal mask)", "native",
            "native ns per query-key"]
    if old is not None:
        head += [f"native built from {baseline.name}", "speed-up", "max |difference|"]
    print(markdown_table(head, table))


def bf16_rows(shapes: list[tuple[int, int]], rows_list: list[int], repeats: int,
              gen: torch.Generator, has_native: bool) -> list[list[str]]:
    """The bf16 rows of the table: the native bf16 linear vs oneDNN's, per layer."""
    layers = []
    for out_f, in_f in shapes:
        w = torch.empty(out_f, in_f, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
        mine = native.NativeLinear(w.clone()) if has_native else None
        layers.append((mine, w))
    table = []
    for rows in rows_list:
        t_native = t_torch = 0.0
        for mine, w in layers:
            x = torch.randn(rows, w.shape[1], generator=gen).to(torch.bfloat16)
            if mine is not None:
                t_native += best(mine, x, repeats=repeats)
            t_torch += best(torch.nn.functional.linear, x, w, repeats=repeats)
        logger.info("bf16 rows %d: native %.1f ms, oneDNN %.1f ms", rows, t_native * 1e3,
                    t_torch * 1e3)
        table.append(["bf16", str(rows), f"{t_native * 1e3:.1f}" if has_native else "-",
                      f"{t_torch * 1e3:.1f}",
                      f"{t_torch / t_native:.2f}x" if has_native else "-", "-",
                      f"{t_torch * 1e3:.1f}"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,8,16,32,64,128,512")
    parser.add_argument("--shapes", choices=sorted(PRESETS), default="6b")
    parser.add_argument("--modes", default="int4,int8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention", action="store_true",
                        help="time decode attention instead of the linears")
    parser.add_argument("--prefill-attention", action="store_true",
                        help="time prefill attention over cached positions instead")
    parser.add_argument("--baseline-source", type=Path,
                        help="with --prefill-attention: an older wq_gemm.c to time alongside")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.attention:
        attention_table(args.shapes, args.repeats)
        return
    if args.prefill_attention:
        prefill_attention_table(args.shapes, args.repeats, args.baseline_source)
        return
    rows_list = [int(r) for r in args.rows.split(",")]
    shapes = linear_shapes(args.shapes)
    mode_arg = {"int4": "4", "int8": "8"}
    gen = torch.Generator().manual_seed(0)
    table = []
    has_native = native.library() is not None
    for mode in args.modes.split(","):
        if mode == "bf16":
            table += bf16_rows(shapes, rows_list, args.repeats, gen, has_native)
            continue
        layers = []
        for out_f, in_f in shapes:
            w = torch.empty(out_f, in_f, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            mine = (quantize_weight(w, mode_arg[mode], kernel=True, native_kernel=True)
                    if has_native else None)
            theirs = quantize_weight(w, mode_arg[mode], kernel=True, native_kernel=False)
            layers.append((mine, theirs, w))
        for rows in rows_list:
            t_native = t_torch = fused = plain = 0.0
            for mine, theirs, w in layers:
                x = torch.randn(rows, theirs.k_pad, generator=gen).to(torch.bfloat16)
                if mine is not None:
                    xn = torch.randn(rows, mine.k_pad, generator=gen).to(torch.bfloat16)
                    t_native += best(mine._kernel_matmul, xn, repeats=args.repeats)
                t_torch += best(theirs._kernel_matmul, x, repeats=args.repeats)
                deq = mine if mine is not None else theirs
                xd = torch.randn(rows, deq.k_pad, generator=gen).to(torch.bfloat16)
                fused += best(deq._dequant_matmul, xd, repeats=args.repeats)
                plain += best(torch.nn.functional.linear, x[:, : w.shape[1]], w,
                              repeats=args.repeats)
            logger.info("%s rows %d: native %.1f ms, torch kernel %.1f ms, dequant+gemm %.1f ms, "
                        "bf16 %.1f ms", mode, rows, t_native * 1e3, t_torch * 1e3, fused * 1e3,
                        plain * 1e3)
            table.append([mode, str(rows), f"{t_native * 1e3:.1f}" if has_native else "-",
                          f"{t_torch * 1e3:.1f}",
                          f"{t_torch / t_native:.2f}x" if has_native else "-",
                          f"{fused * 1e3:.1f}", f"{plain * 1e3:.1f}"])
        del layers
    print(f"\none {args.shapes} layer (4 linears), ms, best of {args.repeats}; "
          f"{machine_summary()}\n")
    print(markdown_table(["weights", "rows", "native", "torch kernel", "native speed-up",
                          "dequant+gemm", "bf16 gemm"], table))


if __name__ == "__main__":
    main()
