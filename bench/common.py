"""What the benchmarks share: ChatGLM2-6B-shaped random models built in memory, memory bandwidth,
the bandwidth bound of decoding, and timing helpers.

The model is the project's own :class:`adapters.chatglm2.model.ChatGLM2Model`, built on the ``meta``
device and materialised one tensor at a time with random values; the four linears of each layer
go through :class:`adapters.weights.loader.QuantizedLinearLoader` exactly as a checkpoint streams through
it, so the full-precision model never exists and the peak memory stays about the final size.
No file is read or written.

Weights are random: the speed of a matmul does not depend on the values, and these scripts never
look at the text a model produces.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapters.chatglm2 import V2_SPEC
from adapters.chatglm2.config import ChatGLM2Config
from adapters.chatglm2.model import ChatGLM2Model
from adapters.weights.loader import QuantizedLinearLoader

logger = logging.getLogger(__name__)

#: THUDM/chatglm2-6b config.json: the values that shape the weights and the compute.
CHATGLM2_6B = ChatGLM2Config(
    padded_vocab_size=65024,
    hidden_size=4096,
    num_layers=28,
    num_attention_heads=32,
    kv_channels=128,
    multi_query_attention=True,
    multi_query_group_num=2,
    ffn_hidden_size=13696,
    add_qkv_bias=True,
    add_bias_linear=False,
    rmsnorm=True,
    post_layer_norm=True,
    layernorm_epsilon=1e-5,
    seq_length=32768,
    eos_token_id=2,
    pad_token_id=0,
    torch_dtype="float16",
    apply_residual_connection_post_layernorm=False,
)

#: Shapes by name.  "mid" keeps 6B's head size, MQA groups and vocabulary (so attention, KV cache
#: and the output layer behave alike) at a quarter of the weights per layer and 8 layers: small
#: enough that an HTTP benchmark with 16 streams finishes in minutes on two cores.
PRESETS: dict[str, ChatGLM2Config] = {
    "6b": CHATGLM2_6B,
    "mid": dataclasses.replace(
        CHATGLM2_6B, hidden_size=2048, num_layers=8, num_attention_heads=16, ffn_hidden_size=6848,
        seq_length=8192,
    ),
}

#: Weight formats a benchmark can build: quantize mode of adapters.weights.format (None = plain bf16).
MODES: dict[str, str | None] = {"bf16": None, "int8": "8", "int4": "4", "int4-g128": "int4-g128"}

#: Random weights of the size a trained checkpoint has (THUDM initialises with std 0.02).
_INIT_STD = 0.02


@dataclass(frozen=True)
class ModelShape:
    """Which model to build: a preset, optionally with fewer layers."""

    preset: str = "6b"
    layers: int | None = None

    @property
    def config(self) -> ChatGLM2Config:
        cfg = PRESETS[self.preset]
        return cfg if self.layers is None else dataclasses.replace(cfg, num_layers=self.layers)

    def describe(self) -> str:
        c = self.config
        return (f"{self.preset}: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_attention_heads}"
                f" heads, kv {c.multi_query_group_num}x{c.kv_channels}, ffn {c.ffn_hidden_size}, "
                f"vocab {c.padded_vocab_size}")


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str = "6b") -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=default_preset,
                        help=f"model shape (default {default_preset})")
    parser.add_argument("--layers", type=int, default=None,
                        help="number of layers (default: the preset's); fewer for quick runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, one per core)")


def shape_from_args(args: argparse.Namespace) -> ModelShape:
    if args.threads:
        torch.set_num_threads(args.threads)
    return ModelShape(args.preset, args.layers)


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
            *, ones: bool = False) -> torch.Tensor:
    if ones:  # norm scales: zero-mean noise would wipe the activations out
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, _INIT_STD, generator=gen)


def build_model(shape: ModelShape, mode: str, *, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16) -> ChatGLM2Model:
    """A random :class:`ChatGLM2Model` of ``shape`` with weights in ``mode`` (a :data:`MODES` key).

    Parameters are materialised one at a time (bf16 random values; norms at one) and each of the
    four linears of a layer is handed to the quantizer as soon as its weight exists, so no more
    than one full-precision linear is alive at any moment.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    cfg = shape.config
    device = torch.device("cpu")
    with torch.device("meta"):
        model = ChatGLM2Model(cfg)
    quant = None
    if MODES[mode] is not None:
        quant = QuantizedLinearLoader(model, V2_SPEC.quant_layout, mode=MODES[mode], dtype=dtype,
                                      device=device)
    gen = torch.Generator().manual_seed(seed)
    for name, param in list(model.named_parameters()):
        value = _random(tuple(param.shape), dtype, gen, ones=name.endswith("layernorm.weight"))
        if quant is not None and quant.take(name, value):
            continue
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(value,
                                                                          requires_grad=False)
    if quant is not None:
        quant.finish()
    model.finish_loading(dtype, device)
    gc.collect()
    return model


def weight_bytes_per_token(model: ChatGLM2Model) -> int:
    """Bytes of weights one decode step must read: every parameter and buffer of the layers, the
    final norm and the output layer, plus ONE row of the embedding (a lookup, not a matmul).
    Non-persistent helper buffers (the rotary table) are left out: a step reads one row of them."""
    t = model.transformer
    total = 0
    for module in (t.encoder, t.output_layer):
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("_unit_scale"):
                continue  # a constant [out] vector of ones: negligible, not a weight
            total += tensor.numel() * tensor.element_size()
    emb = t.embedding.word_embeddings.weight
    return total + emb.shape[1] * emb.element_size()


def model_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Best read bandwidth (GB/s, 1e9 bytes) of ``torch.sum`` over a ``gib`` GiB fp32 tensor.

    Why a sum rather than a copy: decoding streams the weights READ-ONLY through the cores, and a
    float32 sum is the same pattern with negligible arithmetic (one add per 4 bytes, vectorised).
    A copy also writes, and whether write-allocate traffic counts twice or three times is a guess,
    so its GB/s figure is ambiguous.  The tensor is far larger than the L3 cache (32 MiB here).
    The best of ``repeats`` is taken because other processes share the cores.
    """
    x = torch.ones(int(gib * 1024**3) // 4, dtype=torch.float32)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.nbytes / (time.perf_counter() - start) / 1e9)
    del x
    return best


@dataclass(frozen=True)
class Timing:
    """Durations (seconds) of repeated runs; other processes share the cores, so report both."""

    runs: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return Timing(tuple(runs))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_summary() -> str:
    """torch version, thread count and the CPU's matmul-relevant features (AMX / AVX-512 bf16)."""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    present = [f for f in wanted if f in flags]
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"CPU flags: {' '.join(present) or 'unknown'}")
