"""Peak memory and load time of int4 ChatGLM2-6B: quantise-on-load vs a THUDM int4 folder.

    python bench/quant_memory.py --out CACHE_DIR [--layers 28] [--mode 4] [--dtype bfloat16]

Writes (once; reused when present) a ChatGLM2-6B-SHAPED checkpoint with random fp16 weights at
full size (hidden 4096, 28 layers, kv_channels 128, 2 KV groups, ffn 13696, padded vocab 65024:
~12.5 GB, one safetensors shard per layer, written shard by shard so this script stays small in
memory) and its THUDM pre-quantised int4 version (``quantization_bit: 4``).  Then, each in a
fresh subprocess, it loads

* the fp16 folder with ``quantize=MODE`` (every linear quantised as it streams in), and
* the pre-quantised int4 folder,

and prints the child's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), the load time
and the time of a short prefill + decode.  Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from adapters.chatglm2 import V2_SPEC  # noqa: E402
from adapters.weights.checkpoint import CheckpointError  # noqa: E402
from adapters.weights.format import to_thudm_layout  # noqa: E402

# THUDM/chatglm2-6b config.json (the values that shape the weights).
CHATGLM2_6B = {
    "_name_or_path": "THUDM/chatglm2-6b",
    "model_type": "chatglm",
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_softmax_in_fp32": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 32768,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float16",
    "quantization_bit": 0,
}


def layer_tensors(cfg: dict, i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, f, hd = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["kv_channels"]
    qkv = cfg["num_attention_heads"] * hd + 2 * cfg["multi_query_group_num"] * hd
    p = f"transformer.encoder.layers.{i}."

    def rnd(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).half()

    return {
        p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
        p + "self_attention.query_key_value.weight": rnd(qkv, h),
        p + "self_attention.query_key_value.bias": rnd(qkv),
        p + "self_attention.dense.weight": rnd(h, cfg["num_attention_heads"] * hd),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16),
        p + "mlp.dense_h_to_4h.weight": rnd(2 * f, h),
        p + "mlp.dense_4h_to_h.weight": rnd(h, f),
    }


def shards(cfg: dict) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(file name, tensors) one shard at a time: embeddings, one per layer, head."""
    gen = torch.Generator().manual_seed(0)
    n = cfg["num_layers"] + 2
    h, v = cfg["hidden_size"], cfg["padded_vocab_size"]
    yield (
        f"model-00001-of-{n:05d}.safetensors",
        {
            "transformer.embedding.word_embeddings.weight": torch.randn(v, h, generator=gen).half(),
            "transformer.rotary_pos_emb.inv_freq": torch.zeros(cfg["kv_channels"] // 4).half(),
        },
    )
    for i in range(cfg["num_layers"]):
        yield f"model-{i + 2:05d}-of-{n:05d}.safetensors", layer_tensors(cfg, i, gen)
    yield (
        f"model-{n:05d}-of-{n:05d}.safetensors",
        {
            "transformer.encoder.final_layernorm.weight": torch.ones(h, dtype=torch.float16),
            "transformer.output_layer.weight": (torch.randn(v, h, generator=gen) * 0.02).half(),
        },
    )


def write_folder(folder: Path, cfg: dict, stream: Iterator[tuple[str, dict[str, torch.Tensor]]]):
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for fname, tensors in stream:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(folder / fname))
        weight_map |= {k: fname for k in tensors}
        print(f"  wrote {folder.name}/{fname}", flush=True)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    # config last: its presence marks a complete folder
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def quantized_shards(fp16: Path, cfg: dict) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """The fp16 folder's shards rewritten in THUDM's int4 layout, shard by shard."""
    index = json.loads((fp16 / "model.safetensors.index.json").read_text())
    for fname in sorted(set(index["weight_map"].values())):
        from safetensors import safe_open

        with safe_open(str(fp16 / fname), framework="pt") as f:
            tensors = ((k, f.get_tensor(k)) for k in f.keys())  # noqa: SIM118
            yield fname, dict(to_thudm_layout(tensors, V2_SPEC.quant_layout, 4))


def generate(out: Path, layers: int) -> tuple[Path, Path]:
    cfg = CHATGLM2_6B | {"num_layers": layers}
    fp16, int4 = (
        out / f"chatglm2-6b-shaped-{layers}l-fp16",
        out / f"chatglm2-6b-shaped-{layers}l-int4",
    )
    if not (fp16 / "config.json").exists():
        print(f"writing {fp16} (random fp16 weights, {layers} layers)", flush=True)
        write_folder(fp16, cfg, shards(cfg))
    if not (int4 / "config.json").exists():
        print(f"writing {int4} (THUDM int4 layout)", flush=True)
        write_folder(int4, cfg | {"quantization_bit": 4}, quantized_shards(fp16, cfg))
    return fp16, int4


def child(folder: Path, mode: str | None, dtype: str) -> None:
    """Runs in a fresh process: load, run a little, report one JSON line."""
    from adapters.chatglm2.config import read_config
    from adapters.chatglm2.model import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    result: dict = {"folder": folder.name, "quantize": mode, "dtype": dtype}
    try:
        model = load_model(
            folder, read_config(folder), dtype=getattr(torch, dtype), device="cpu", quantize=mode
        )
    except (CheckpointError, NotImplementedError, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result), flush=True)
        return
    result["load_s"] = round(time.perf_counter() - started, 1)
    result["peak_rss_after_load_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    weights = sum(b.nbytes for b in model.buffers()) + sum(p.nbytes for p in model.parameters())
    result["model_bytes_mb"] = round(weights / 2**20)
    cache = model.new_cache()
    t = time.perf_counter()
    model.forward(list(range(100, 132)), cache)
    result["prefill_32_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    for token in range(8):
        model.forward([200 + token], cache)
    result["decode_tok_per_s"] = round(8 / (time.perf_counter() - t), 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["rss_while_running_mb"] = current_rss_mb()
    print(json.dumps(result), flush=True)


def current_rss_mb() -> int:
    """Resident memory now (Linux /proc), as opposed to ru_maxrss's peak."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return round(resident_pages * resource.getpagesize() / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="cache folder for the checkpoints")
    parser.add_argument("--layers", type=int, default=28, help="layers (28 = full ChatGLM2-6B)")
    parser.add_argument("--mode", default="4", help="quantize= mode for the fp16 load")
    parser.add_argument("--dtype", default="bfloat16", help="activation / non-quantised dtype")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.child_mode, args.dtype)
        return
    fp16, int4 = generate(args.out, args.layers)
    runs = [(fp16, args.mode), (int4, None)]
    for folder, mode in runs:
        cmd = [
            sys.executable,
            __file__,
            "--out",
            str(args.out),
            "--dtype",
            args.dtype,
            "--child",
            str(folder),
        ]
        if mode is not None:
            cmd += ["--child-mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(
                f"{folder.name} quantize={mode}: child failed ({proc.returncode})\n{proc.stderr[-2000:]}"
            )
            continue
        r = json.loads(lines[-1])
        print(json.dumps(r))
    disk = {f.name: round(sum(p.stat().st_size for p in f.iterdir()) / 2**20) for f in (fp16, int4)}
    print(json.dumps({"folder_size_mb": disk}))


if __name__ == "__main__":
    main()
