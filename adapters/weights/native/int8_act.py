"""int8-activation GEMMs on AVX512-VNNI (``i8_gemm.c`` beside this file), for the opt-in
``--int8-activations`` path (:mod:`adapters.weights.activations` switches layers onto it).

Activations are quantised per row (token), symmetric, ``scale = max|x| / 127``, and multiplied
with the layer's own int4 / int8 weights (the packed tensors of the weight-only kernels in
``wq_gemm.c``, shared, not copied) in exact int32 sums; the result is scaled by both scales in
fp32.  Built like ``wq_gemm.c`` (same cache, compiler and switch, ``CHATGLM_GATEWAY_NATIVE=0``)
and checked against a float64 reference of the same quantised computation before use.
:func:`library` is ``None`` where it cannot be used (no AVX512-VNNI, not x86-64 Linux, no
compiler, switched off), the reason logged once; the layers then keep the exact path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.weights import native

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("i8_gemm.c")
FLAGS = (
    "-O3", "-fPIC", "-shared", "-fopenmp",
    "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-lm",
)


def _load() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise OSError("no C compiler (cc or $CC) on PATH")
    lib = ctypes.CDLL(str(native._compile(compiler, SOURCE, FLAGS)))
    lib.i8_cpu_supported.restype = ctypes.c_int
    if not lib.i8_cpu_supported():
        raise OSError("this CPU lacks AVX512-VNNI")
    lib.i8_block_rows.restype = ctypes.c_int
    if lib.i8_block_rows() != native.BLOCK_ROWS:
        raise OSError(f"{SOURCE.name} was built with another row block than {native.BLOCK_ROWS}")
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.i8_quantize_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, c_int, c_int]
    lib.i8_quantize_rows.restype = None
    lib.i8_weight_row_sums.argtypes = [ptr, i64, i64, ptr, c_int]
    lib.i8_weight_row_sums.restype = None
    lib.i8_gemm_w4.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, c_int, c_int]
    lib.i8_gemm_w4.restype = c_int
    lib.i8_gemm_w8.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, c_int, c_int]
    lib.i8_gemm_w8.restype = c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded int8-activation library, or ``None`` where it cannot be used (reason logged)."""
    return native.checked_library("int8-activation kernels", "computing exactly", _load,
                                  _self_test)


@dataclass(frozen=True)
class QuantizedRows:
    """Activations quantised per row: ``values`` ``[M, k_pad]`` (int8 ``q``, or uint8 ``q + 128``
    for int8 weights), fp32 ``scale [M]`` (``max|x| / 127``), int32 ``qsum [M]`` (sum of ``q``)."""

    values: torch.Tensor
    scale: torch.Tensor
    qsum: torch.Tensor


def quantize_rows(lib: ctypes.CDLL, x: torch.Tensor, k_pad: int, *,
                  plus128: bool) -> QuantizedRows:
    """Quantise contiguous bf16 ``x [M, K]`` per row; columns ``K..k_pad`` are zeros."""
    m, k = x.shape
    if x.dtype != torch.bfloat16 or not x.is_contiguous() or k_pad < k or k_pad % 16:
        raise ValueError(f"contiguous bf16 [M, <= {k_pad}] expected")
    values = torch.empty(m, k_pad, dtype=torch.uint8 if plus128 else torch.int8)
    scale = torch.empty(m, dtype=torch.float32)
    qsum = torch.empty(m, dtype=torch.int32)
    lib.i8_quantize_rows(x.data_ptr(), m, k, k_pad, values.data_ptr(), scale.data_ptr(),
                         qsum.data_ptr(), int(plus128), _threads())
    return QuantizedRows(values, scale, qsum)


def weight_row_sums(lib: ctypes.CDLL, packed: torch.Tensor) -> torch.Tensor:
    """Sum of each row of int8 weights in :func:`~adapters.weights.native.pack_int8`'s layout;
    int32 ``[n_pad]``."""
    if packed.dtype != torch.int8 or packed.shape[0] % native.BLOCK_ROWS:
        raise ValueError("packed int8 weights expected")
    out = torch.empty(packed.shape[0], dtype=torch.int32)
    lib.i8_weight_row_sums(packed.data_ptr(), packed.shape[0], packed.shape[1], out.data_ptr(),
                           _threads())
    return out


def gemm(lib: ctypes.CDLL, rows: QuantizedRows, packed: torch.Tensor, scale: torch.Tensor,
         bias: torch.Tensor | None, wsum: torch.Tensor | None,
         out_dtype: torch.dtype) -> torch.Tensor:
    """``(q . w^T) * rows.scale[:, None] * scale (+ bias)`` for ``packed`` int4 (uint8, from
    :func:`~adapters.weights.native.pack_int4`, with signed ``rows``) or int8 (with ``wsum``
    from :func:`weight_row_sums` and ``q + 128`` rows); ``[M, n_pad]`` in ``out_dtype``
    (fp32, or bf16 rounded once from the fp32 result)."""
    m, k = rows.values.shape
    n = packed.shape[0]
    int4 = packed.dtype == torch.uint8
    if int4 != (rows.values.dtype == torch.int8) or (not int4 and wsum is None):
        raise ValueError("int4 weights take signed rows; int8 weights take q + 128 and wsum")
    if packed.shape[1] * (2 if int4 else 1) != k or k % native.K_MULTIPLE:
        raise ValueError(f"packed weights of {k} columns expected")
    if scale.dtype != torch.float32 or scale.shape != (n,):
        raise ValueError(f"fp32 scale [{n}] expected")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,)):
        raise ValueError(f"fp32 bias [{n}] expected")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    y = torch.empty(m, n, dtype=out_dtype)
    bias_ptr = None if bias is None else bias.data_ptr()
    out_bf16 = int(out_dtype == torch.bfloat16)
    if int4:
        rc = lib.i8_gemm_w4(rows.values.data_ptr(), rows.scale.data_ptr(), rows.qsum.data_ptr(),
                            m, k, packed.data_ptr(), scale.data_ptr(), bias_ptr, n, y.data_ptr(),
                            out_bf16, _threads())
    else:
        assert wsum is not None
        rc = lib.i8_gemm_w8(rows.values.data_ptr(), rows.scale.data_ptr(), m, k,
                            packed.data_ptr(), wsum.data_ptr(), scale.data_ptr(), bias_ptr, n,
                            y.data_ptr(), out_bf16, _threads())
    if rc != 0:
        raise MemoryError("the int8-activation kernel could not allocate its weight buffers")
    return y


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`gemm` computes, in float64 from the unquantised inputs: bf16 ``x [M, K]``
    quantised per row as ``i8_gemm.c`` does (fp32 ``round(x * (127 / max|x|))``), times the
    integer weights ``q [N, K]`` and both scales (+ ``bias``); ``[M, N]`` float64."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    # a true fp32 division (torch computes `127.0 / tensor` as 127 * reciprocal: 1 ulp apart)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    qa = (xf * inv).round()
    y = (qa.double() @ q.double().T) * (amax.double() / 127.0).float().double() \
        * scale.double()
    return y if bias is None else y + bias.double()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _self_test(lib: ctypes.CDLL) -> bool:
    """Both weight kinds against :func:`reference` on odd shapes (row tails, several tiles)."""
    gen = torch.Generator().manual_seed(0)
    n, k = 12, 128
    x = torch.randn(7, k, generator=gen).to(torch.bfloat16)
    x[3] = 0  # a row of zeros: scale 0
    scale = torch.rand(n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen)
    ok = True
    for bits, low, high in ((4, -8, 8), (8, -127, 128)):
        q = torch.randint(low, high, (n, k), generator=gen, dtype=torch.int8)
        packed = native.pack_int4(q, n, k) if bits == 4 else native.pack_int8(q, n, k)
        rows = quantize_rows(lib, x, k, plus128=bits == 8)
        wsum = weight_row_sums(lib, packed) if bits == 8 else None
        got = gemm(lib, rows, packed, scale, bias, wsum, torch.float32).double()
        ref = reference(x, q, scale, bias)
        ok = ok and bool((got - ref).abs().max() <= 1e-5 * ref.abs().max())
    return ok
