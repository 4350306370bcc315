"""Weight-only int8/int4 linear layers on torch's own kernels and the native ones.

The weights are THUDM's (see :mod:`adapters.weights.format`).  The layers here reproduce that dequantised weight exactly on torch's CPU kernels:

* :class:`Int8Linear` runs ``aten._weight_int8pack_mm`` with a unit scale, then multiplies the fp32
  accumulator by the fp16 row scale in fp32: the bf16 kernel only takes bf16 scales, and rounding an
  fp16 scale to bf16 would change the weights.
* :class:`Int4Linear` repacks the symmetric nibbles q in [-7, 7] as torch's asymmetric uint4
  ``u = q + 8`` with ``zero = 0`` (the kernel computes ``(u - 8) * scale + zero``).  Per-row scales are
  applied after the kernel as for int8 (kernel group scales are 1); group-wise scales are chosen
  bf16-exact by :func:`quantize_groupwise`, so the kernel holds them without rounding.

The kernels are fast only with bf16 activations (fp16/fp32 run reference loops on CPU in torch
2.13), so activations are cast to bf16 for the kernel and the result back to the
caller's dtype.  Where a kernel is unavailable (other devices, older torch) the layers fall back to
dequantising per call and a plain matmul in the activation dtype.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from adapters.weights import native
from adapters.weights.format import (
    CONVERT_ROWS,
    QUANT_SCHEMES,
    QuantLayout,
    pack_int4_thudm,
    quantize_groupwise,
    quantize_rowwise,
    unpack_int4_thudm,
)

if TYPE_CHECKING:
    from adapters.weights.activations import Int8Activations

logger = logging.getLogger(__name__)

#: Group sizes ``_weight_int4pack_mm_for_cpu`` accepts (its error message in torch 2.13).
KERNEL_INT4_GROUPS = (256, 128, 64, 32)
#: ``_convert_weight_to_int4pack_for_cpu``: "expect N to be dividable by 16".
_INT4_N_MULTIPLE = 16
#: ``_weight_int8pack_mm`` on CPU reads past the row when K % 16 != 0 (garbage or a segfault with
#: torch 2.13, found by a shape sweep), so the kernel path pads K with zero columns.
_INT8_K_MULTIPLE = 16
_KERNEL_DTYPE = torch.bfloat16
#: From this many activation rows (tokens in one call: a prefill chunk) on, a kernel-path layer
#: dequantises its weight to bf16 (in chunks) and runs bf16 GEMMs (oneDNN/MKL) instead of the
#: fused kernel: ``_weight_int4pack_mm_for_cpu`` re-dequantises the weight for every block of 4
#: rows (int4mm_kernel.cpp ``BLOCK_M = 4``) and ``_weight_int8pack_mm`` grows alike, so their cost
#: is linear in the rows, while dequantising costs a fixed time per layer and the GEMM less per
#: row.  Crossovers measured with ``python -m bench.kernels`` (figures in bench/README.md).
#: Batched decode (at most ``max_running`` rows) stays below them.
DEQUANT_MIN_ROWS = {"int8": 32, "int4": 96}
#: Weight elements dequantised at a time on that path: 8 Mi bf16 = 16 MB per chunk stays under
#: glibc's largest mmap threshold (32 MB), so chunks are recycled from the heap instead of being
#: fresh zero-filled pages on every call (page faults dominated the one-shot dequantisation).
_DEQUANT_CHUNK_ELEMENTS = 2**23
# --------------------------------------------------------------------------- kernels


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


#: (convert op, mm op) of torch's int4 kernels per device type.
_INT4_KERNEL_OPS = {
    "cpu": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
    "cuda": ("_convert_weight_to_int4pack", "_weight_int4pack_mm"),
}


def _int4_kernel_ops(device_type: str) -> tuple[Callable[..., torch.Tensor], ...]:
    return tuple(getattr(torch.ops.aten, name) for name in _INT4_KERNEL_OPS[device_type])


def _int4_pack_for_kernel(
    q: torch.Tensor, k_pad: int, n_pad: int, device_type: str
) -> torch.Tensor:
    """Symmetric int8 ``q [N, K]`` -> the device kernel's packed uint4 ``u = q + 8`` (zero-padded
    to ``[n_pad, k_pad]`` with u = 8, i.e. q = 0), converted in row blocks to bound the transient."""
    convert = _int4_kernel_ops(device_type)[0]
    parts = []
    for i in range(0, n_pad, CONVERT_ROWS):
        rows = min(CONVERT_ROWS, n_pad - i)
        block = q[i : i + rows]
        u = nn.functional.pad(
            block.to(torch.int32) + 8, (0, k_pad - q.shape[1], 0, rows - block.shape[0]), value=8
        )
        if device_type == "cpu":
            # _convert_weight_to_int4pack_for_cpu packs 64-row blocks independently, so
            # converting row blocks (multiples of 64) gives the bytes of the whole matrix.
            parts.append(convert(u, 1))
        else:
            # CUDA takes bytes (u[2j] << 4 | u[2j+1]) and tiles of 16 columns (gpt-fast's recipe);
            # its packing is not row-block local, so CUDA converts the whole matrix at once.
            parts.append(((u[:, 0::2] << 4) | u[:, 1::2]).to(torch.uint8))
    if device_type == "cpu":
        return torch.cat(parts)
    tiles = next(t for t in (8, 4, 2) if k_pad % (t * 16) == 0)
    return convert(torch.cat(parts), tiles)


@functools.cache
def kernel_available(kind: str, device: str) -> bool:
    """Whether torch's ``kind`` ("int8" / "int4") kernel runs correctly on ``device``.

    Probed once per device with a small random layer against the dequantised reference, so an
    unsupported device or a torch build without the op falls back instead of failing mid-request.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-7, 8, (32, 64), generator=gen, dtype=torch.int8)
    x = torch.randn(3, 64, generator=gen)
    scale = torch.rand(32, generator=gen).half() + 0.5
    ref = x @ (q.float() * scale.float()[:, None]).T
    layer: Int8Linear | Int4Linear
    try:
        if kind == "int8":
            layer = Int8Linear(q.to(dev), scale.to(dev), kernel=True)
        else:
            layer = Int4Linear(
                q.to(dev), scale.float()[:, None].to(dev), group_size=64, kernel=True
            )
        got = layer(x.to(dev)).float().cpu()
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        logger.warning("%s kernel unavailable on %s (%s); dequantising per call", kind, device, exc)
        return False
    ok = bool((got - ref).abs().max() <= 2**-6 * ref.abs().max())  # bf16 in/out: ~2^-8
    if not ok:
        logger.warning(
            "%s kernel on %s disagrees with the reference; dequantising per call", kind, device
        )
    return ok


def unpack_int4_cpu(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """``_convert_weight_to_int4pack_for_cpu``'s bytes -> bf16 ``[k, n]`` (the weight TRANSPOSED)
    holding ``u - 8``, for ``n`` a multiple of ``block``.

    int4mm_kernel.cpp ``weight_to_int4pack_kernel``: rows are packed in blocks of ``block`` (64 with
    AVX-512, 32 with AVX2) as ``[n / block, k, block / 2]`` bytes whose LOW nibble is row ``j`` and
    HIGH nibble row ``j + block / 2`` of the block.  Writing ``[k, n]`` keeps both the reads and the
    writes in contiguous runs of ``block / 2`` (the ``[n, k]`` order measured slower), and
    ``x @ wt`` takes the transposed operand as is.
    """
    half = block // 2
    pb = packed.view(torch.uint8).view(n // block, k, half)
    wt = torch.empty(k, n // block, block, dtype=_KERNEL_DTYPE, device=packed.device)
    wt[:, :, :half] = (pb & 0xF).permute(1, 0, 2)
    wt[:, :, half:] = (pb >> 4).permute(1, 0, 2)
    return wt.view(k, n).sub_(8)


@functools.cache
def int4_cpu_block() -> int | None:
    """The row block of torch's CPU int4 packing on this machine (64 or 32), found by packing a
    probe matrix and unpacking it with :func:`unpack_int4_cpu`; ``None`` when neither layout
    matches (a future torch): the layers then keep the fused kernel for every call."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (128, 64), generator=gen, dtype=torch.int32)
    try:
        packed = _int4_kernel_ops("cpu")[0](u, 1)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    for block in (64, 32):
        if packed.numel() * 2 == u.numel() and torch.equal(
            unpack_int4_cpu(packed, 128, 64, block).T.to(torch.int32) + 8, u
        ):
            return block
    logger.warning("unknown CPU int4 packing layout: int4 prefill keeps the fused kernel")
    return None


# --------------------------------------------------------------------------- layers


def _use_native(kernel: bool, device: torch.device, requested: bool | None) -> bool:
    """Whether a kernel-path layer on ``device`` runs on the native kernel (``requested``: None =
    wherever it is available; True = required, an error where it is not)."""
    available = kernel and device.type == "cpu" and native.library() is not None
    if requested and not available:
        raise ValueError("the native kernel needs the kernel path, a CPU and AVX512-BF16")
    return available if requested is None else requested


def _dequant_chunks(rows: int, k: int, multiple: int) -> Iterator[slice]:
    """Row slices of about :data:`_DEQUANT_CHUNK_ELEMENTS` weights, each a multiple of ``multiple``
    rows (but the last)."""
    step = max(multiple, _DEQUANT_CHUNK_ELEMENTS // k // multiple * multiple)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class _WeightOnlyLinear(nn.Module):
    """What the int8 and int4 layers share: the kernel/fallback dispatch and ``dequantize``.

    Subclasses provide ``_kernel_matmul`` (bf16 ``[M, k_pad]`` -> fp32 ``[M, out]``, row scales
    applied) and ``_stored_weight`` (fp32 ``[out, in]`` from the fallback representation).
    """

    in_features: int
    out_features: int
    k_pad: int
    kernel: bool
    bias: torch.Tensor | None
    dequant_min_rows: int

    # native kernel path (adapters/weights/native): weights in its interleaved layout, fp32 row scales
    native: bool = False
    packed: torch.Tensor
    native_scale: torch.Tensor
    native_bias: torch.Tensor | None
    _native_gemm_name: str
    #: the opt-in int8-activation path (:mod:`adapters.weights.activations`): calls with at least
    #: its ``min_rows`` activation rows quantise them to int8 and multiply on AVX512-VNNI
    int8_activations: Int8Activations | None = None

    def _init_native(self, pack: Callable[[int, int], torch.Tensor], row_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> None:
        out_f = self.out_features
        self.k_pad = _round_up(self.in_features, native.K_MULTIPLE)
        n_pad = _round_up(out_f, native.BLOCK_ROWS)
        self.register_buffer("packed", pack(n_pad, self.k_pad))
        scale = torch.zeros(n_pad)
        scale[:out_f] = row_scale.float()
        self.register_buffer("native_scale", scale)
        # the bias as the kernel adds it (fp32, padded), kept beside the model-dtype copy
        native_bias = None
        if bias is not None:
            native_bias = torch.zeros(n_pad)
            native_bias[:out_f] = bias.float()
        self.register_buffer("native_bias", native_bias, persistent=False)

    def _native_gemm(self) -> Callable[..., torch.Tensor]:
        lib = native.library()
        assert lib is not None
        gemm = native.int8_gemm if self.packed.dtype == torch.int8 else native.int4_gemm
        return functools.partial(gemm, lib)

    def _native_matmul(self, xk: torch.Tensor) -> torch.Tensor:
        return self._native_gemm()(xk, self.packed, self.native_scale)[:, : self.out_features]

    def _native_weight_rows(self, rows: slice) -> torch.Tensor:
        """Packed rows ``rows`` (whole blocks of 4) as bf16 ``[rows, k_pad]`` without scales."""
        raise NotImplementedError

    def _native_dequant_matmul(self, xk: torch.Tensor) -> torch.Tensor:
        n_pad = self.packed.shape[0]
        y = torch.empty(xk.shape[0], n_pad)
        for rows in _dequant_chunks(n_pad, self.k_pad, native.BLOCK_ROWS):
            y[:, rows] = nn.functional.linear(xk, self._native_weight_rows(rows))
        return y[:, : self.out_features] * self.native_scale[: self.out_features]

    def _kernel_matmul(self, xk: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequant_matmul(self, xk: torch.Tensor) -> torch.Tensor | None:
        """``_kernel_matmul``'s result through a bf16 copy of the weight and one GEMM (for many
        rows), or ``None`` where that path does not exist."""
        return None

    def _stored_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight the layer multiplies by: on the kernel path as the kernel sees it
        (the kernel applied to the identity, row scales then applied in fp32)."""
        if not self.kernel:
            return self._stored_weight()
        device = self.bias.device if self.bias is not None else next(self.buffers()).device
        eye = torch.eye(self.k_pad, dtype=_KERNEL_DTYPE, device=device)
        return self._kernel_matmul(eye).T[:, : self.in_features].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        int8_act = self.int8_activations
        if int8_act is not None and x2.shape[0] >= int8_act.min_rows:
            return int8_act(x2).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if (self.native and x.dtype == _KERNEL_DTYPE and self.k_pad == self.in_features
                and x2.shape[0] < self.dequant_min_rows):
            # The decode path in one kernel call: bias added and bf16 rounding done in the kernel
            # (the same fp32 sum, rounded once, as the path below's `(y + bias).to(bf16)`).
            y = self._native_gemm()(x2.contiguous(), self.packed, self.native_scale,
                                    self.native_bias, _KERNEL_DTYPE)
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.kernel:
            xk = x2.to(_KERNEL_DTYPE)
            if self.k_pad != self.in_features:
                xk = nn.functional.pad(xk, (0, self.k_pad - self.in_features))
            xk = xk.contiguous()
            acc = self._dequant_matmul(xk) if xk.shape[0] >= self.dequant_min_rows else None
            if acc is None:
                acc = self._kernel_matmul(xk)
            if self.bias is not None:
                acc = acc + self.bias.float()
            y = acc.to(x.dtype)
        else:
            w = self._stored_weight().to(x.dtype)
            y = nn.functional.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel={self.kernel}"
        )


class Int8Linear(_WeightOnlyLinear):
    """``y = x @ (q * scale[:, None]).T + bias`` with int8 ``q [out, in]`` and a per-row scale."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    _unit_scale: torch.Tensor
    dequant_min_rows = DEQUANT_MIN_ROWS["int8"]

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        kernel: bool | None = None,
        native_kernel: bool | None = None,
    ) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scale.shape != weight.shape[:1]:
            raise ValueError(
                f"int8 [out, in] + scale [out] expected, got {weight.dtype} "
                f"{tuple(weight.shape)} / {tuple(scale.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        if kernel is None:
            kernel = kernel_available("int8", str(weight.device))
        self.kernel = kernel
        self.native = _use_native(bool(kernel), weight.device, native_kernel)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)
        if self.native:
            # the gateway's own kernel (adapters/weights/native): 4-row interleaved layout only
            self.dequant_min_rows = native.DEQUANT_MIN_ROWS["int8"]
            self._init_native(lambda n_pad, k_pad: native.pack_int8(weight, n_pad, k_pad),
                              scale, bias)
            return
        self.k_pad = _round_up(self.in_features, _INT8_K_MULTIPLE) if kernel else self.in_features
        weight = nn.functional.pad(weight, (0, self.k_pad - self.in_features))
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer(
            "_unit_scale",
            torch.ones(self.out_features, dtype=_KERNEL_DTYPE, device=weight.device),
            persistent=False,
        )

    def _stored_weight(self) -> torch.Tensor:
        # exact: an int8 times an fp16 scale fits in fp32
        return self.weight[:, : self.in_features].float() * self.weight_scale.float()[:, None]

    def _kernel_matmul(self, xk: torch.Tensor) -> torch.Tensor:
        if self.native:
            return self._native_matmul(xk)
        acc = torch.ops.aten._weight_int8pack_mm(xk, self.weight, self._unit_scale)
        return acc.float() * self.weight_scale.float()

    def _native_weight_rows(self, rows: slice) -> torch.Tensor:
        return native.unpack_int8(self.packed, rows.start, rows.stop).to(_KERNEL_DTYPE)

    def _dequant_matmul(self, xk: torch.Tensor) -> torch.Tensor | None:
        if self.native:
            return self._native_dequant_matmul(xk)
        # int8 values are exact in bf16: the same bf16 product of x and q as the kernel's, then
        # the same fp32 row scaling.
        y = torch.empty(xk.shape[0], self.out_features, device=xk.device)
        for rows in _dequant_chunks(self.out_features, self.k_pad, 1):
            y[:, rows] = nn.functional.linear(xk, self.weight[rows].to(_KERNEL_DTYPE))
        return y.mul_(self.weight_scale.float())


class Int4Linear(_WeightOnlyLinear):
    """``y = x @ W.T + bias`` with ``W[r, c] = q[r, c] * scales[r, c // group_size]``, q in [-7, 7].

    ``scales`` is ``[out, 1]`` for THUDM's per-row int4 (``group_size`` = in_features) or
    ``[out, ceil(in / group_size)]`` group-wise.  On the kernel path the weight is stored in the
    device kernel's packed layout only, padded with zero rows/columns to the kernel's multiples.
    """

    bias: torch.Tensor | None
    row_scale: torch.Tensor | None
    dequant_min_rows = DEQUANT_MIN_ROWS["int4"]
    # fallback path
    qweight: torch.Tensor
    scales: torch.Tensor | None
    # kernel path
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(
        self,
        q: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
        *,
        kernel: bool | None = None,
        native_kernel: bool | None = None,
    ) -> None:
        super().__init__()
        out_f, in_f = q.shape
        n_groups = -(-in_f // group_size)
        if q.dtype != torch.int8 or scales.shape != (out_f, n_groups):
            raise ValueError(
                f"int8 q [out, in] and scales [out, {n_groups}] expected, got "
                f"{q.dtype} {tuple(q.shape)} / {tuple(scales.shape)}"
            )
        self.out_features, self.in_features = out_f, in_f
        self.group_size = group_size
        self.per_row = n_groups == 1
        self.native = False
        device = q.device
        if kernel is None:
            kernel = device.type in _INT4_KERNEL_OPS and kernel_available("int4", str(device))
        if kernel and not self.per_row and group_size not in KERNEL_INT4_GROUPS:
            raise ValueError(f"group size {group_size} is not one of {KERNEL_INT4_GROUPS}")
        self.kernel = kernel
        self.register_buffer("bias", bias)
        # Per-row scales are applied after the kernel in fp32 (kept exact); group scales go into it.
        self.register_buffer("row_scale", scales[:, 0].clone() if self.per_row else None)
        if not kernel:
            self.k_pad = in_f
            k_even = _round_up(in_f, 2)
            self.register_buffer(
                "qweight", pack_int4_thudm(nn.functional.pad(q, (0, k_even - in_f)))
            )
            self.register_buffer("scales", None if self.per_row else scales.float())
            return
        # THUDM's per-row int4 on a CPU with AVX512-BF16: the gateway's own kernel
        # (adapters/weights/native), faster than torch's at every batch size (bench/README.md).
        if native_kernel and not self.per_row:
            raise ValueError("the native int4 kernel needs per-row scales")
        self.native = self.per_row and _use_native(bool(kernel), device, native_kernel)
        if self.native:
            self.dequant_min_rows = native.DEQUANT_MIN_ROWS["int4"]
            self._init_native(lambda n_pad, k_pad: native.pack_int4(q, n_pad, k_pad),
                              scales[:, 0], bias)
            return
        if self.per_row:
            k_pad = _round_up(in_f, min(KERNEL_INT4_GROUPS))
            self.kernel_group = next(g for g in KERNEL_INT4_GROUPS if k_pad % g == 0)
            group_scales = torch.ones(out_f, k_pad // self.kernel_group, device=device)
        else:
            k_pad = n_groups * group_size
            self.kernel_group = group_size
            group_scales = scales.float()
        n_pad = _round_up(out_f, _INT4_N_MULTIPLE)
        self.k_pad = k_pad
        self.register_buffer("packed", _int4_pack_for_kernel(q, k_pad, n_pad, device.type))
        sz = torch.zeros(k_pad // self.kernel_group, n_pad, 2, dtype=_KERNEL_DTYPE, device=device)
        sz[:, :out_f, 0] = group_scales.T.to(_KERNEL_DTYPE)
        self.register_buffer("scales_and_zeros", sz)

    def _stored_weight(self) -> torch.Tensor:
        w = unpack_int4_thudm(self.qweight)[:, : self.in_features].float()
        if self.scales is not None:
            w = w * self.scales.repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        return w if self.row_scale is None else w * self.row_scale.float()[:, None]

    def _dequant_matmul(self, xk: torch.Tensor) -> torch.Tensor | None:
        # Per-row scales only: the unpacked q (integers in [-8, 7]) is exact in bf16 and the row
        # scale is applied in fp32 as on the kernel path.  Group scales would have to be folded
        # into the bf16 weight, rounding it, so group-wise layers keep the kernel.
        if self.native:
            return self._native_dequant_matmul(xk)
        n_pad = self.packed.shape[0]
        block = int4_cpu_block() if self.packed.device.type == "cpu" else None
        if not self.per_row or block is None or n_pad % block:
            return None
        y = torch.empty(xk.shape[0], n_pad, device=xk.device)
        for rows in _dequant_chunks(n_pad, self.k_pad, block):
            # whole packing blocks: the packed rows rows.start..rows.stop are those output rows
            wt = unpack_int4_cpu(self.packed[rows], rows.stop - rows.start, self.k_pad, block)
            y[:, rows] = xk @ wt
        y = y[:, : self.out_features]
        return y if self.row_scale is None else y * self.row_scale.float()

    def _native_weight_rows(self, rows: slice) -> torch.Tensor:
        lib = native.library()
        assert lib is not None
        return native.int4_dequant(lib, self.packed, rows.start, rows.stop)

    def _kernel_matmul(self, xk: torch.Tensor) -> torch.Tensor:
        if self.native:
            return self._native_matmul(xk)
        mm = _int4_kernel_ops(self.packed.device.type)[1]
        y = mm(xk, self.packed, self.kernel_group, self.scales_and_zeros)
        y = y[:, : self.out_features].float()
        return y if self.row_scale is None else y * self.row_scale.float()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, native={self.native}"


# --------------------------------------------------------------------------- builders


def from_thudm(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    kernel: bool | None = None,
) -> Int8Linear | Int4Linear:
    """A layer from a THUDM pre-quantised checkpoint's ``<linear>.weight`` / ``.weight_scale``.

    Only this layer's int8 values are unpacked transiently; no fp weight is materialised.
    """
    device = torch.device(device) if device is not None else weight.device
    weight, weight_scale = weight.to(device), weight_scale.to(device)
    bias = None if bias is None else bias.to(device)
    if bits == 8:
        return Int8Linear(weight, weight_scale, bias, kernel=kernel)
    if bits == 4:
        q = unpack_int4_thudm(weight)
        return Int4Linear(q, weight_scale[:, None], group_size=q.shape[1], bias=bias, kernel=kernel)
    raise ValueError(f"quantization_bit must be 4 or 8, got {bits}")


class QuantizedEmbedding(nn.Module):
    """THUDM's int4/int8 word embedding (``chatglm-6b-int4-qe``): rows are dequantised
    (``q * scale`` in float32, as the reference's CPU ``extract_weight_to_float``) only for the ids
    looked up, so the table stays at 4 or 8 bits per weight."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bits: int,
                 dtype: torch.dtype):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits, self.dtype = bits, dtype
        self.weight: torch.Tensor = weight
        self.weight_scale: torch.Tensor = weight_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.weight[flat]
        q = unpack_int4_thudm(rows) if self.bits == 4 else rows
        values = q.float() * self.weight_scale[flat].float()[:, None]
        return values.to(self.dtype).reshape(*ids.shape, -1)


def quantize_weight(
    weight: torch.Tensor,
    mode: str,
    bias: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    kernel: bool | None = None,
    native_kernel: bool | None = None,
    arithmetic: torch.dtype = torch.float16,
) -> Int8Linear | Int4Linear:
    """Quantise one linear's full-precision ``weight [out, in]`` with a :data:`QUANT_SCHEMES` mode
    (``arithmetic``: the family's reference rounding for the THUDM modes, see
    :attr:`~adapters.weights.format.QuantLayout.arithmetic`)."""
    scheme = QUANT_SCHEMES.get(mode)
    if scheme is None:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {sorted(QUANT_SCHEMES)}")
    device = torch.device(device) if device is not None else weight.device
    bias = None if bias is None else bias.to(device)
    if scheme.group_size is None:
        q, scale = quantize_rowwise(weight.to(device), scheme.bits, arithmetic)
        if scheme.bits == 8:
            return Int8Linear(q, scale, bias, kernel=kernel, native_kernel=native_kernel)
        return Int4Linear(q, scale[:, None], group_size=q.shape[1], bias=bias, kernel=kernel,
                          native_kernel=native_kernel)
    q, scales = quantize_groupwise(weight.to(device), scheme.group_size, scheme.bits)
    return Int4Linear(q, scales, group_size=scheme.group_size, bias=bias, kernel=kernel)


def use_native_linears(model: nn.Module, layout: QuantLayout) -> int:
    """Put the bf16 ``nn.Linear`` layers that ``layout`` names (the four of every layer: those a
    quantised model keeps in int4/int8) on the native bf16 kernel, in place (each weight's storage
    is repacked, no second copy); returns how many.  Nothing changes where the kernels are not
    built, off the CPU or in another dtype (float32 models keep THUDM's fp32 arithmetic).

    Why: oneDNN reads bf16 weights at ~half the memory's rate for one activation row, and its
    summation order depends on the number of rows, so a bf16 sequence's logits depended on its
    batch; the kernel's do not (:class:`~adapters.weights.native.NativeLinear`)."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not layout.covers(name):
            continue
        layer = native.NativeLinear.replacing(module)
        if isinstance(layer, native.NativeLinear):
            layer.layer_linear = True
        if layer is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            swapped += 1
    return swapped
