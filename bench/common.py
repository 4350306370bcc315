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

from adapters.chatglm import SPEC as V1_SPEC
from adapters.chatglm.config import ChatGLMConfig
from adapters.chatglm.model import ChatGLMModel
from adapters.chatglm2 import V2_SPEC
from adapters.chatglm2.config import ChatGLM2Config
from adapters.chatglm2.model import ChatGLM2Model
from adapters.weights import native
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

#: THUDM/chatglm-6b config.json (v1: multi-head KV cache, 130528-token vocabulary, tied output
#: layer).  Only the benchmarks that take ``--preset v1-6b`` build it.
CHATGLM_6B = ChatGLMConfig(vocab_size=130528, max_sequence_length=2048)
PRESETS_V1: dict[str, ChatGLMConfig] = {"v1-6b": CHATGLM_6B}

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

    @property
    def v1(self) -> bool:
        """A ChatGLM-6B (v1) shape: built by :func:`build_model` as a ChatGLMModel."""
        return self.preset in PRESETS_V1

    @property
    def v1_config(self) -> ChatGLMConfig:
        cfg = PRESETS_V1[self.preset]
        return cfg if self.layers is None else dataclasses.replace(cfg, num_layers=self.layers)

    def describe(self) -> str:
        if self.v1:
            v = self.v1_config
            return (f"{self.preset}: hidden {v.hidden_size}, {v.num_layers} layers, "
                    f"{v.num_attention_heads} heads (KV cache multi-head), ffn "
                    f"{v.inner_hidden_size}, vocab {v.vocab_size}")
        c = self.config
        return (f"{self.preset}: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_attention_heads}"
                f" heads, kv {c.multi_query_group_num}x{c.kv_channels}, ffn {c.ffn_hidden_size}, "
                f"vocab {c.padded_vocab_size}")


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str = "6b") -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS) + sorted(PRESETS_V1),
                        default=default_preset,
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
    """A random :class:`ChatGLM2Model` (or :class:`ChatGLMModel` for a v1 preset) of ``shape``
    with weights in ``mode`` (a :data:`MODES` key).

    Parameters are materialised one at a time (bf16 random values; norms at one) and each of the
    four linears of a layer is handed to the quantizer as soon as its weight exists, so no more
    than one full-precision linear is alive at any moment.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    device = torch.device("cpu")
    model: ChatGLM2Model | ChatGLMModel
    with torch.device("meta"):
        model = ChatGLMModel(shape.v1_config) if shape.v1 else ChatGLM2Model(shape.config)
    layout = (V1_SPEC if shape.v1 else V2_SPEC).quant_layout
    quant = None
    if MODES[mode] is not None:
        quant = QuantizedLinearLoader(model, layout, mode=MODES[mode], dtype=dtype,
                                      device=device)
    gen = torch.Generator().manual_seed(seed)
    for name, param in list(model.named_parameters()):
        norm = name.endswith("layernorm.weight")
        if name.endswith("layernorm.bias"):  # v1's LayerNorm: zero shift
            value = torch.zeros(tuple(param.shape), dtype=dtype)
        else:
            value = _random(tuple(param.shape), dtype, gen, ones=norm)
        if quant is not None and quant.take(name, value):
            continue
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(value,
                                                                          requires_grad=False)
    if quant is not None:
        quant.finish()
    model.finish_loading(dtype, device)
    gc.collect()
    # a ChatGLMModel for v1 presets: the benchmarks use only what both families have
    return model  # type: ignore[return-value]


def torch_linears(model: nn.Module) -> int:
    """Put the four linears of every layer back on torch's ``nn.Linear`` (oneDNN for bf16): the
    path bf16 models took before the native bf16 linears, for side-by-side timing.  Returns how
    many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, native.NativeLinear) and ".layers." in name:
            linear = nn.Linear(module.in_features, module.out_features,
                               bias=module.bias is not None, dtype=torch.bfloat16, device="meta")
            linear.weight = nn.Parameter(module.plain_weight(), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias[: module.out_features].to(torch.bfloat16),
                                           requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
            swapped += 1
    gc.collect()
    return swapped


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step must read: every parameter and buffer of the layers, the
    final norm and the output layer, plus ONE row of the embedding (a lookup, not a matmul).
    Non-persistent helper buffers (the rotary table) are left out: a step reads one row of them.
    ChatGLM-6B's output layer is its embedding table (tied): counted once, in full."""
    seen: set[int] = set()
    total = 0
    rows = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("_unit_scale") or name.endswith("rope") or tensor.data_ptr() in seen:
            continue  # constant vectors of ones / tables read one row at a time; a tied copy
        seen.add(tensor.data_ptr())
        if name.endswith("embedding.word_embeddings.weight"):  # ChatGLM2: an untied lookup table
            rows = tensor.shape[1] * tensor.element_size()
            continue
        total += tensor.numel() * tensor.element_size()
    return total + rows


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


class DecodeRates:
    """tok/s of a timed decode window, in wall and in CPU time (a mixin for run records with
    ``tokens``, ``wall`` and ``cpu`` fields: the CPU rate is what a busy host cannot stretch)."""

    tokens: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.tokens / self.wall

    @property
    def cpu_rate(self) -> float:
        return self.tokens / self.cpu


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
