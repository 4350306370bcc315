"""THUDM's quantised weight format: the schemes, which linears a family quantises, and the bytes.

THUDM's ``model.quantize(bits)`` (quantization.py of chatglm-6b-int4 / chatglm2-6b-int4) keeps, per
output row r of the four linears of every layer, an fp16 ``weight_scale[r] = absmax_r / (2**(bits-1) - 1)``
and ``q = round(w / scale)`` as int8; int4 packs two columns per byte, the EVEN column in the HIGH
nibble.  Dequantised, ``w[r, c] = q[r, c] * scale[r]``.  The layers that compute with these weights
are in :mod:`adapters.weights.layers`; the loader that builds them in :mod:`adapters.weights.loader`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

#: Rows per block when quantising / packing (a multiple of the CPU int4 packing's 64-row blocks):
#: bounds the per-layer transient at a few tens of MB for 6B-sized linears.
CONVERT_ROWS = 4096


@dataclass(frozen=True)
class QuantScheme:
    """A quantisation mode as data: bit width and group size (``None``: one scale per output row)."""

    bits: int
    group_size: int | None


#: ``quantize=`` modes a loader accepts.
QUANT_SCHEMES: dict[str, QuantScheme] = {
    "8": QuantScheme(bits=8, group_size=None),  # THUDM int8 (model.quantize(8))
    "4": QuantScheme(bits=4, group_size=None),  # THUDM int4 (model.quantize(4))
    "int4-g128": QuantScheme(bits=4, group_size=128),  # symmetric absmax/7 per 128 columns
}

@dataclass(frozen=True)
class QuantLayout:
    """Which linears of a family's checkpoint THUDM quantises, and how its reference rounds.

    A family describes itself with one of these (its folder owns the module names); the loader
    and the format helpers take it, so nothing here names a family.
    """

    #: module-name prefix of the transformer layers, e.g. ``"transformer.layers."``
    layer_prefix: str
    #: the quantised linears' names inside a layer
    linears: tuple[str, ...]
    #: the dtype the family's reference ``quantize`` computes ``round(w / scale)`` in (read off
    #: THUDM's pre-quantised fixtures): ChatGLM2/3 quantise the fp16 weights in fp16; ChatGLM-6B
    #: computes in float32 with the unrounded scale and stores the scale as fp16 afterwards
    arithmetic: torch.dtype
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        suffixes = "|".join(re.escape(s) for s in self.linears)
        pattern = re.compile(
            rf"{re.escape(self.layer_prefix)}\d+\.(?:{suffixes})(?:\.(?:weight|weight_scale|bias))?")
        object.__setattr__(self, "_pattern", pattern)

    def covers(self, name: str) -> bool:
        """Whether ``name`` (a module name, or one of its ``.weight`` / ``.weight_scale`` /
        ``.bias`` tensors) is one of the linears this layout quantises."""
        return self._pattern.fullmatch(name) is not None


def pack_int4_thudm(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in]`` with values in [-8, 7] -> int8 ``[out, in/2]`` in THUDM's byte layout:
    ``(q[2j] << 4) | (q[2j+1] & 0xF)`` (quantization.py ``compress_int4_weight``)."""
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"expected int8 [out, even in], got {q.dtype} {tuple(q.shape)}")
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)


def unpack_int4_thudm(packed: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in/2]`` THUDM int4 bytes -> int8 ``[out, in]``: high nibble = even column,
    both nibbles sign-extended (``hi = b >> 4``, ``lo = (b << 4) >> 4`` on int8)."""
    if packed.dtype != torch.int8 or packed.dim() != 2:
        raise ValueError(f"expected int8 [out, in/2], got {packed.dtype} {tuple(packed.shape)}")
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int8, device=packed.device)
    out[:, 0::2] = packed >> 4
    out[:, 1::2] = (packed << 4) >> 4
    return out


def quantize_rowwise(
    w: torch.Tensor, bits: int, arithmetic: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's ``QuantizedLinear.__init__`` bit for bit: ``(q int8 [out, in], scale fp16 [out])``.

    ``arithmetic`` is the dtype the reference computes in (:attr:`QuantLayout.arithmetic`): with fp16
    the scale is an fp16 division and ``w / scale`` is rounded to fp16 BEFORE ``torch.round``;
    with fp32 both happen in fp32 and only the stored scale is rounded to fp16.
    An all-zero row (scale 0) gets q = 0 where THUDM would cast NaN to int8.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float16, device=w.device)
    for i in range(
        0, w.shape[0], CONVERT_ROWS
    ):  # rows are independent: blocks bound the transient
        block = w[i : i + CONVERT_ROWS].to(arithmetic)
        s = block.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)
        qb = torch.round(block / s[:, None])
        q[i : i + CONVERT_ROWS] = qb.masked_fill_(s[:, None] == 0, 0).to(torch.int8)
        scale[i : i + CONVERT_ROWS] = s
    return q, scale


def quantize_groupwise(
    w: torch.Tensor, group_size: int, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantisation per ``group_size`` columns (the last group may be shorter).

    Returns ``(q int8 [out, in], scales float32 [out, ceil(in / group_size)])``.  Scales are rounded
    to bf16 values first (the int4 kernel holds its group scales in bf16, so this keeps the kernel
    lossless); q is then clamped to [-(2**(bits-1) - 1), 2**(bits-1) - 1].
    """
    out_f, in_f = w.shape
    qmax = 2 ** (bits - 1) - 1
    n_groups = -(-in_f // group_size)
    w32 = w.to(torch.float32)
    padded = torch.nn.functional.pad(w32, (0, n_groups * group_size - in_f))
    absmax = padded.view(out_f, n_groups, group_size).abs().amax(dim=-1)
    scales = (absmax / qmax).to(torch.bfloat16).to(torch.float32)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(w32 / safe.repeat_interleave(group_size, dim=1)[:, :in_f])
    return q.clamp_(-qmax, qmax).to(torch.int8), scales


def to_thudm_layout(
    tensors: Iterable[tuple[str, torch.Tensor]], layout: QuantLayout, bits: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rewrite a full-precision tensor stream as THUDM's pre-quantised folder holds it: each
    quantised ``<linear>.weight`` becomes int8 (packed for int4) plus ``<linear>.weight_scale``;
    everything else passes through.  One linear at a time: for writing int4/int8 folders."""
    for name, tensor in tensors:
        if layout.covers(name) and name.endswith(".weight"):
            q, scale = quantize_rowwise(tensor, bits, layout.arithmetic)
            yield name, q if bits == 8 else pack_int4_thudm(q)
            yield f"{name}_scale", scale
        else:
            yield name, tensor
