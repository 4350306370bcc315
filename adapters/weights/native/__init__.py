"""The gateway's own CPU kernels (``wq_gemm.c`` beside this file).

Why kernels of our own: torch's ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` multiply
in fp32 FMAs and re-dequantise the weight for every block of 4 activation rows, so batched decoding
on a CPU costs almost as much per sequence as decoding alone, and oneDNN's bf16 GEMV reads the
output layer at half the memory's rate.  No library on PyPI ships such kernels for torch on the CPU
(torchao's CPU kernels are not in its PyPI wheels; llama.cpp's work on its own model format).
``wq_gemm.c`` has, for x86-64 with AVX512-BF16:

* int4 / int8 / bf16 weight GEMMs on AVX512-BF16 dot products (exact bf16 integers for the
  quantised weights: 2x the fp32 FMA rate, the same products) reading each thread's weights as
  one sequential stream (``python -m bench.kernels`` compares them with torch's kernels), for
  every linear of a bf16 model too (:class:`NativeLinear`);
* attention over each sequence's own KV cache, in place, for decode steps and prefill chunks
  (ChatGLM2/3, and ChatGLM-6B's ``attention_fn`` roundings);
* RMSNorm, rotary embedding and SwiGLU, each one call, with torch's bf16 roundings.

Each output row of a GEMM and each attention query is computed in an order fixed by that row
alone, whatever else is passed with it, so a sequence's logits are bit-identical alone, in any
batch, and however its prompt was split into prefill chunks (``wq_gemm.c`` says how).

It is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``$CHATGLM_GATEWAY_CACHE/kernels`` (default ``~/.cache/chatglm-gateway/kernels``), keyed by a hash
of the source, flags and compiler, checked against a float64 reference, then loaded with
:mod:`ctypes` (calls release the GIL).  Where it cannot be used (not x86-64 Linux, no compiler, a
CPU without AVX512-BF16, or ``CHATGLM_GATEWAY_NATIVE=0``) :func:`library` returns ``None``, the
reason logged once, and every layer uses torch's kernels and ops as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("wq_gemm.c")
#: ``CHATGLM_GATEWAY_NATIVE=0`` turns the kernel off (comparisons, troubleshooting).
ENV_SWITCH = "CHATGLM_GATEWAY_NATIVE"
CACHE_ENV = "CHATGLM_GATEWAY_CACHE"
FLAGS = (
    # no fused multiply-adds the source does not ask for: the few-row and many-row loops must
    # round every scalar step alike (wq_gemm.c store_output)
    "-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off",
    "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-lm",
)
#: The kernel's K granularity: one chunk is 64 columns (two 32-lane bf16 vectors).
K_MULTIPLE = 64
#: Weight rows per register block (``NB`` in wq_gemm.c, checked at load): N is padded to it.
BLOCK_ROWS = 4
#: activation rows from which wq_gemm.c's GEMMs take their many-row loop (ROWS_WIDEN_ONCE)
WIDEN_ONCE_ROWS = 64


#: Activation rows from which a layer on these kernels would dequantise its weight to bf16 and run
#: oneDNN's GEMM instead: never.  oneDNN picks its blocking, so its summation order, by the number
#: of rows, so a prompt's logits would depend on what else was prefilled in the same chunk and on
#: where the chunk boundaries fell.  The kernels' many-row loop (``quant_gemm_rows`` in wq_gemm.c:
#: each weight block widened to bf16 once per call, not once per 4 rows) gives every row the bits
#: of the few-row loop.  Without AMX it ties with dequant+GEMM at 512 rows
#: (``python -m bench.kernels``); with AMX oneDNN's GEMM would be several times faster, at the
#: price of batch invariance (not measured here: no AMX).
DEQUANT_MIN_ROWS = {"int4": 2**62, "int8": 2**62}


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "chatglm-gateway"
    return Path(root) / "kernels"


def _compile(compiler: str, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    """Build the shared library of ``source`` (once per source/flags/compiler) and return its
    path (``int8_act.py`` builds a second library, from ``i8_gemm.c``, with this)."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256(
        source.read_bytes() + " ".join(flags).encode() + version.encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, "-o", tmp, str(source)],
            capture_output=True, text=True, check=True,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("compiled the native CPU kernels into %s", target)
    return target


def _load(source: Path = SOURCE) -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise OSError("no C compiler (cc or $CC) on PATH")
    lib = ctypes.CDLL(str(_compile(compiler, source)))
    lib.wq_cpu_supported.restype = ctypes.c_int
    if not lib.wq_cpu_supported():
        raise OSError("this CPU lacks AVX512-BF16")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.wq_block_rows.restype = ctypes.c_int
    lib.wq_widen_rows.restype = ctypes.c_int
    if lib.wq_block_rows() != BLOCK_ROWS:
        raise OSError(f"{SOURCE.name} was built with another row block than {BLOCK_ROWS}")
    if lib.wq_widen_rows() != WIDEN_ONCE_ROWS:
        raise OSError(f"{SOURCE.name} takes its many-row loop from another row count than "
                      f"{WIDEN_ONCE_ROWS}")
    lib.wq_int4_gemm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ctypes.c_int,
                                 ctypes.c_int]
    lib.wq_int4_gemm.restype = None
    lib.wq_int8_gemm.argtypes = lib.wq_int4_gemm.argtypes
    lib.wq_int8_gemm.restype = None
    lib.wq_int4_dequant.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.wq_int4_dequant.restype = None
    lib.wq_bf16_gemm.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.wq_bf16_gemm.restype = None
    lib.wq_bf16_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int, ctypes.c_int]
    lib.wq_bf16_linear.restype = None
    lib.wq_decode_attention.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64,
                                        ptr, ptr, i64, ctypes.c_float, ctypes.c_int]
    lib.wq_decode_attention.restype = None
    lib.wq_prefill_attention.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, i64, ptr,
                                         ctypes.c_float, ptr, ctypes.c_int]
    lib.wq_prefill_attention.restype = None
    lib.wq_rms_norm.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
    lib.wq_swiglu.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    lib.wq_rotary.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, ctypes.c_int]
    for name in ("wq_rms_norm", "wq_swiglu", "wq_rotary"):
        getattr(lib, name).restype = None
    return lib


def checked_library(what: str, fallback: str, load: Callable[[], ctypes.CDLL],
                    self_test: Callable[[ctypes.CDLL], bool]) -> ctypes.CDLL | None:
    """``load()``'s library where it can be used: not switched off (``ENV_SWITCH=0``), on x86-64
    Linux, built, and agreeing with its float64 ``self_test``; else ``None``, with the reason
    logged (``what``: the kernels' name in the log; ``fallback``: what runs instead)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        logger.info("%s=0: no %s; %s", ENV_SWITCH, what, fallback)
        return None
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        logger.info("%s are x86-64 Linux only; %s", what, fallback)
        return None
    try:
        lib = load()
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        logger.info("%s unavailable (%s); %s", what, detail, fallback)
        return None
    if not self_test(lib):
        logger.warning("%s disagree with the reference; %s", what, fallback)
        return None
    logger.info("%s in use (%s)", what, lib._name)
    return lib


def library_from(source: Path) -> ctypes.CDLL:
    """A library built from another copy of ``wq_gemm.c`` (an earlier revision), with the same
    entry points: the benchmarks time it side by side with :func:`library`.  Raises ``OSError``
    where it cannot be built or loaded."""
    return _load(source)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or ``None`` where it cannot be used (reason logged once)."""
    return checked_library("native CPU kernels", "using torch's kernels", _load, _self_test)


def _check_padding(shape: tuple[int, ...], n_pad: int, k_pad: int, k_multiple: int) -> None:
    n, k = shape
    if n_pad % BLOCK_ROWS or k_pad % k_multiple or n_pad < n or k_pad < k:
        raise ValueError(f"bad padding {n_pad}x{k_pad} for {n}x{k}")


def _padded_rows(w: torch.Tensor, n_pad: int, k_pad: int,
                 dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, rows)``: ``w`` zero-padded to ``[n_pad, k_pad]`` as ``dtype``, a copy of at
    most 1024 rows at a time (bounds the transient of a 6B-sized linear)."""
    n, k = w.shape
    step = 1024
    for start in range(0, n_pad, step):
        stop = min(start + step, n_pad)
        rows = torch.zeros(stop - start, k_pad, dtype=dtype)
        src = w[start:min(stop, n)]
        rows[: src.shape[0], :k] = src.cpu()
        yield start, stop, rows


def _interleave(rows: torch.Tensor, run: int) -> torch.Tensor:
    """``[r, width]`` (r a multiple of 4) -> the kernels' layout: per block of 4 rows, chunks of
    4 runs of ``run`` elements, one run per row."""
    r, width = rows.shape
    blocks = rows.reshape(r // BLOCK_ROWS, BLOCK_ROWS, width // run, run).transpose(1, 2)
    return blocks.reshape(r, width)


def pack_int4(q: torch.Tensor, n_pad: int, k_pad: int) -> torch.Tensor:
    """Symmetric int8 ``q [N, K]`` in [-8, 7] -> the kernel's layout (see ``wq_gemm.c``),
    zero-padded (u = 8) to ``[n_pad, k_pad]``; uint8 ``[n_pad, k_pad / 2]``."""
    _check_padding(q.shape, n_pad, k_pad, K_MULTIPLE)
    out = torch.empty(n_pad, k_pad // 2, dtype=torch.uint8)
    for start, stop, rows in _padded_rows(q, n_pad, k_pad, torch.int16):
        u = (rows + 8).to(torch.uint8).view(stop - start, k_pad // 64, 2, 32)
        runs = u[:, :, 0, :] | (u[:, :, 1, :] << 4)  # [rows, chunks, 32]: low nibble first half
        out[start:stop] = _interleave(runs.view(stop - start, k_pad // 2), 32)
    return out


#: Head sizes the attention kernels take: multiples of this (a last half vector is masked).
ATTENTION_HEAD_MULTIPLE = 16

#: The bf16 kernel's K granularity: one chunk is 32 columns (one 32-lane bf16 vector).
BF16_K_MULTIPLE = 32


def pack_bf16(w: torch.Tensor, n_pad: int, k_pad: int, *, in_place: bool = False) -> torch.Tensor:
    """bf16 ``w [N, K]`` -> the bf16 kernel's layout (blocks of 4 rows, chunks of 32 columns, one
    run of 32 values per row), zero-padded to ``[n_pad, k_pad]``; bf16 ``[n_pad, k_pad]``.

    ``in_place``: where no padding is needed and ``w`` is a contiguous bf16 CPU tensor, rearrange
    ``w`` itself and return it (the permutation stays within each block of 4 rows), so a
    65024 x 4096 output layer needs no second copy; ``w`` is then no longer a plain weight."""
    _check_padding(w.shape, n_pad, k_pad, BF16_K_MULTIPLE)
    in_place = in_place and tuple(w.shape) == (n_pad, k_pad) and w.is_contiguous() \
        and w.device.type == "cpu" and w.dtype == torch.bfloat16
    out = w if in_place else torch.empty(n_pad, k_pad, dtype=torch.bfloat16)
    for start, stop, rows in _padded_rows(w, n_pad, k_pad, torch.bfloat16):
        out[start:stop] = _interleave(rows, 32)  # `rows` is a copy: `out` may be `w` itself
    return out


def bf16_gemm(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for contiguous bf16 ``x [M, k_pad]`` and ``packed`` from :func:`pack_bf16`;
    fp32 ``[M, n_pad]``."""
    m, k = x.shape
    n = packed.shape[0]
    if x.dtype != torch.bfloat16 or not x.is_contiguous() or packed.shape[1] != k:
        raise ValueError(f"contiguous bf16 [M, {packed.shape[1]}] expected")
    y = torch.empty(m, n, dtype=torch.float32)
    lib.wq_bf16_gemm(x.data_ptr(), m, k, packed.data_ptr(), n, y.data_ptr(), _threads())
    return y


def bf16_linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor,
                bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for contiguous bf16 ``x [M, k_pad]``, ``packed`` from
    :func:`pack_bf16` and an fp32 ``bias [n_pad]``; ``[M, n_pad]`` in ``out_dtype`` (fp32, or bf16
    rounded once from the fp32 sum).  Every output row's bits are independent of M."""
    m, k = x.shape
    n = packed.shape[0]
    if x.dtype != torch.bfloat16 or not x.is_contiguous() or packed.shape[1] != k:
        raise ValueError(f"contiguous bf16 [M, {packed.shape[1]}] expected")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,)):
        raise ValueError(f"fp32 bias [{n}] expected")
    y = torch.empty(m, n, dtype=out_dtype)
    lib.wq_bf16_linear(x.data_ptr(), m, k, packed.data_ptr(),
                       None if bias is None else bias.data_ptr(), n, y.data_ptr(),
                       int(out_dtype == torch.bfloat16), _threads())
    return y


class DecodeBatch:
    """Where a decode step's sequences keep their KV caches, for :func:`decode_attention`:
    each cache's storage ``[layers, 2, groups, capacity, head_dim]`` (bf16, contiguous) and its
    length after this step.  Built once per step, after every cache made room for the new
    position (the storage must not move during the step)."""

    def __init__(self, storages: list[torch.Tensor], lengths: list[int]) -> None:
        for kv in storages:
            if kv.dtype != torch.bfloat16 or not kv.is_contiguous() or kv.device.type != "cpu":
                raise ValueError("KV storage must be contiguous bf16 on the CPU")
        self.storages = storages  # keeps the tensors alive while their addresses are used
        self.base = torch.tensor([kv.data_ptr() for kv in storages], dtype=torch.int64)
        self.cap = torch.tensor([kv.shape[3] for kv in storages], dtype=torch.int64)
        self.len = torch.tensor(lengths, dtype=torch.int64)
        self.max_len = max(lengths)
        if any(n > kv.shape[3] for n, kv in zip(lengths, storages, strict=True)):
            raise ValueError("a length exceeds its cache's capacity")


def decode_attention(lib: ctypes.CDLL, batch: DecodeBatch, layer: int, q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, glm_coeff: float = 0.0) -> torch.Tensor:
    """Store this step's ``k``/``v`` ``[B, 1, groups, hd]`` at each sequence's last position of
    ``layer`` and attend ``q [B, 1, heads, hd]`` over every cached position; ``[B, heads, 1, hd]``
    bf16 (see ``wq_decode_attention`` in wq_gemm.c; ``glm_coeff`` > 0: ChatGLM-6B's
    ``attention_fn`` with that layer's scaling coefficient, ``q`` already divided by it).
    Each query is computed as :func:`prefill_attention` computes it."""
    b, _, heads, hd = q.shape
    groups = k.shape[2]
    if hd % ATTENTION_HEAD_MULTIPLE or heads % groups or b != len(batch.storages):
        raise ValueError(f"unsupported decode attention shape {tuple(q.shape)} / {tuple(k.shape)}")
    q, k, v = (t.to(torch.bfloat16).contiguous() for t in (q, k, v))
    out = torch.empty(b, heads, 1, hd, dtype=torch.bfloat16)
    scratch = torch.empty(b * heads * (-(-batch.max_len // 16) * 16), dtype=torch.float32)
    lib.wq_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), b, heads, groups, hd,
                            batch.base.data_ptr(), batch.cap.data_ptr(), batch.len.data_ptr(),
                            layer, out.data_ptr(), scratch.data_ptr(),
                            -(-batch.max_len // 16) * 16, glm_coeff, _threads())
    return out


def prefill_attention(lib: ctypes.CDLL, storage: torch.Tensor, layer: int, q: torch.Tensor,
                      lengths: torch.Tensor, glm_coeff: float = 0.0) -> torch.Tensor:
    """Attention of the ``T`` queries ``q [T, heads, hd]`` (rows may be strided, heads contiguous)
    of one sequence whose keys/values for these positions are already in its cache ``storage``
    ``[layers, 2, groups, capacity, hd]``: query ``t`` attends positions ``0 .. lengths[t] - 1``
    (int64 ``[T]``).  ``[T, heads, hd]`` bf16.  Every query gets the bits a decode step of it
    would (``wq_prefill_attention``), so a prompt's results do not depend on its chunking."""
    t, heads, hd = q.shape
    groups, cap = storage.shape[2], storage.shape[3]
    if q.stride(2) != 1 or q.stride(1) != hd:
        q = q.contiguous()
    if (q.dtype != torch.bfloat16 or hd % ATTENTION_HEAD_MULTIPLE or heads % groups or storage.shape[4] != hd
            or storage.dtype != torch.bfloat16 or not storage.is_contiguous()
            or lengths.dtype != torch.int64 or lengths.shape != (t,)
            or int(lengths.max()) > cap or int(lengths.min()) < 1):
        raise ValueError(f"unsupported prefill attention shape {tuple(q.shape)} / "
                         f"{tuple(storage.shape)}")
    lengths = lengths.contiguous()
    out = torch.empty(t, heads, hd, dtype=torch.bfloat16)
    lib.wq_prefill_attention(q.data_ptr(), q.stride(0), t, heads, groups, hd,
                             storage[layer].data_ptr(), cap, lengths.data_ptr(), glm_coeff,
                             out.data_ptr(), _threads())
    return out


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ChatGLM2's RMSNorm of bf16 ``x [..., H]`` with a bf16 ``weight [H]`` (wq_gemm.c)."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h).contiguous()
    w = weight.contiguous()
    if x2.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or w.shape != (h,) or h % 16:
        raise ValueError("bf16 activations and weight of a width divisible by 16 expected")
    out = torch.empty_like(x2)
    lib.wq_rms_norm(x2.data_ptr(), w.data_ptr(), x2.shape[0], h, eps, out.data_ptr(), _threads())
    return out.view(x.shape)


def swiglu(lib: ctypes.CDLL, h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of bf16 ``h [..., 2F] = [gate | up]`` (modeling_chatglm.py swiglu)."""
    f = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * f).contiguous()
    if h2.dtype != torch.bfloat16 or f % 16:
        raise ValueError("bf16 activations of a width divisible by 32 expected")
    out = torch.empty(h2.shape[0], f, dtype=torch.bfloat16)
    lib.wq_swiglu(h2.data_ptr(), h2.shape[0], f, out.data_ptr(), _threads())
    return out.view(*h.shape[:-1], f)


def rotary_(lib: ctypes.CDLL, mixed: torch.Tensor, heads: int, head_dim: int,
            rope: torch.Tensor) -> None:
    """Rotate, in place, the first ``heads`` heads of every row of the bf16 projection
    ``mixed [B, T, width]`` (queries then keys) by ``rope [B or 1, T, pairs, 2]``."""
    b, t, width = mixed.shape
    if (mixed.dtype != torch.bfloat16 or not mixed.is_contiguous() or heads * head_dim > width
            or rope.dtype != torch.bfloat16 or 2 * rope.shape[-2] > head_dim):
        raise ValueError("contiguous bf16 projection and bf16 rope table expected")
    table = rope.expand(b, t, *rope.shape[-2:]).contiguous()
    lib.wq_rotary(mixed.data_ptr(), b * t, width, heads, head_dim, table.data_ptr(),
                  rope.shape[-2], _threads())


def _threads() -> int:
    return max(1, torch.get_num_threads())


def pack_int8(q: torch.Tensor, n_pad: int, k_pad: int) -> torch.Tensor:
    """int8 ``q [N, K]`` -> the int8 kernel's layout (blocks of 4 rows, chunks of 64 columns, one
    run of 64 bytes per row), zero-padded to ``[n_pad, k_pad]``; int8 ``[n_pad, k_pad]``."""
    _check_padding(q.shape, n_pad, k_pad, K_MULTIPLE)
    out = torch.empty(n_pad, k_pad, dtype=torch.int8)
    for start, stop, rows in _padded_rows(q, n_pad, k_pad, torch.int8):
        out[start:stop] = _interleave(rows, 64)
    return out


def unpack_int8(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` (multiples of 4) of :func:`pack_int8`'s layout as ``[rows, k_pad]``."""
    k = packed.shape[1]
    rows = packed[start:stop].reshape((stop - start) // BLOCK_ROWS, k // 64, BLOCK_ROWS, 64)
    return rows.transpose(1, 2).reshape(stop - start, k)


def int8_gemm(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`int4_gemm` for ``packed`` from :func:`pack_int8`."""
    if packed.dtype != torch.int8:
        raise ValueError("packed int8 weights expected")
    return _weight_only_gemm(lib.wq_int8_gemm, x, packed, packed.shape[1], scale, bias, out_dtype)


def int4_gemm(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x @ (u - 8).T) * scale (+ bias)`` for contiguous bf16 ``x [M, k_pad]``, ``packed`` from
    :func:`pack_int4`, fp32 ``scale`` and ``bias`` ``[n_pad]``; ``[M, n_pad]`` in ``out_dtype``
    (fp32, or bf16 rounded once from the fp32 result)."""
    if packed.dtype != torch.uint8:
        raise ValueError("packed int4 weights expected")
    return _weight_only_gemm(lib.wq_int4_gemm, x, packed, packed.shape[1] * 2, scale, bias,
                             out_dtype)


def _weight_only_gemm(fn: Callable[..., None], x: torch.Tensor, packed: torch.Tensor, k_pad: int,
                      scale: torch.Tensor, bias: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[0]
    if x.dtype != torch.bfloat16 or not x.is_contiguous() or k != k_pad:
        raise ValueError(f"contiguous bf16 [M, {k_pad}] expected")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    if scale.dtype != torch.float32 or scale.shape != (n,):
        raise ValueError(f"fp32 scale [{n}] expected")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,)):
        raise ValueError(f"fp32 bias [{n}] expected")
    y = torch.empty(m, n, dtype=out_dtype)
    fn(x.data_ptr(), m, k, packed.data_ptr(), scale.data_ptr(),
       None if bias is None else bias.data_ptr(), n, y.data_ptr(),
       int(out_dtype == torch.bfloat16), _threads())
    return y


def int4_dequant(lib: ctypes.CDLL, packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` (multiples of 4) of the packed weight as bf16 integers ``u - 8``,
    ``[stop - start, k_pad]``."""
    k = packed.shape[1] * 2
    out = torch.empty(stop - start, k, dtype=torch.bfloat16)
    lib.wq_int4_dequant(packed.data_ptr(), k, start, stop, out.data_ptr(), _threads())
    return out


def _self_test(lib: ctypes.CDLL) -> bool:
    """The kernel against a float64 reference on odd shapes (tails of M, several blocks)."""
    gen = torch.Generator().manual_seed(0)
    n, k = 12, 128
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) + 0.5
    # the few-row loop (first 7 rows) and the many-row one (all) must both be right
    x_many = torch.randn(WIDEN_ONCE_ROWS + 5, k, generator=gen).to(torch.bfloat16)
    x = x_many[:7].contiguous()
    packed = pack_int4(q, n, k)
    ref = (x.double() @ q.double().T) * scale.double()
    got = int4_gemm(lib, x, packed, scale).double()
    deq = int4_dequant(lib, packed, 4, 12)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    ref_bf16 = x.double() @ w.double().T
    got_bf16 = bf16_gemm(lib, x, pack_bf16(w, n, k)).double()
    q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    ref8 = (x.double() @ q8.double().T) * scale.double()
    got8 = int8_gemm(lib, x, pack_int8(q8, n, k), scale).double()
    got_many = int4_gemm(lib, x_many, packed, scale)
    bias = torch.randn(n, generator=gen)
    lin = bf16_linear(lib, x_many, pack_bf16(w, n, k), bias).double()
    ref_lin = x_many.double() @ w.double().T + bias.double()
    return bool(
        (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        and torch.equal(got_many[:7], got.float())
        and (lin - ref_lin).abs().max() <= 1e-5 * ref_lin.abs().max()
        and (got8 - ref8).abs().max() <= 1e-5 * ref8.abs().max()
        and torch.equal(deq.to(torch.int8), q[4:12])
        and (got_bf16 - ref_bf16).abs().max() <= 1e-5 * ref_bf16.abs().max()
    )


class NativeLinear(nn.Module):
    """A bf16 linear on the bf16 kernel: the output layer (one row per sequence, 15 % of a
    ChatGLM2-6B int4 model's bytes) and every linear of a bf16 model.  Computes what
    ``nn.Linear`` does in bf16 (fp32 accumulation, + bias, rounded once to the input's dtype), with
    each row's bits independent of the rows passed with it (a sequence's logits do not depend on
    its batch)."""

    packed: torch.Tensor
    bias: torch.Tensor | None
    #: one of a layer's four linears (set by ``use_native_linears``), not the output layer
    layer_linear: bool = False
    #: the opt-in int8-activation path for calls of many rows (``--int8-activations``; an
    #: ``adapters.weights.activations.Int8Activations``), else None
    int8_activations: Any = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.k_pad = -(-self.in_features // BF16_K_MULTIPLE) * BF16_K_MULTIPLE
        n_pad = -(-self.out_features // BLOCK_ROWS) * BLOCK_ROWS
        # in place where no padding is needed: the linear's weight storage becomes the packed one
        self.register_buffer("packed", pack_bf16(weight.detach(), n_pad, self.k_pad,
                                                 in_place=True))
        padded_bias = None
        if bias is not None:  # as the kernel adds it: fp32, padded
            padded_bias = torch.zeros(n_pad)
            padded_bias[: self.out_features] = bias.detach().float()
        self.register_buffer("bias", padded_bias)

    @classmethod
    def replacing(cls, linear: nn.Module) -> nn.Module:
        """``linear`` on the kernel where it applies (bf16, on the CPU, kernel built), which takes
        over ``linear``'s weight storage (``linear`` must not be used after); otherwise
        ``linear`` itself."""
        weight = getattr(linear, "weight", None)
        if (
            not isinstance(linear, nn.Linear)
            or weight is None
            or weight.dtype != torch.bfloat16
            or weight.device.type != "cpu"
            or library() is None
        ):
            return linear
        return cls(weight, linear.bias)

    def plain_weight(self) -> torch.Tensor:
        """The bf16 weight ``[out, in]`` in the plain row-major layout (a copy)."""
        n_pad, k_pad = self.packed.shape
        blocks = self.packed.reshape(n_pad // BLOCK_ROWS, k_pad // 32, BLOCK_ROWS, 32)
        plain = blocks.transpose(1, 2).reshape(n_pad, k_pad)
        return plain[: self.out_features, : self.in_features].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = library()
        assert lib is not None
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        int8_act = self.int8_activations
        if int8_act is not None and x2.shape[0] >= int8_act.min_rows:
            y = int8_act(x2)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.k_pad != self.in_features:
            x2 = nn.functional.pad(x2, (0, self.k_pad - self.in_features))
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        y = bf16_linear(lib, x2.contiguous(), self.packed, self.bias, out_dtype)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, native=True")


class PackedEmbedding(nn.Module):
    """A word embedding whose table is also the (tied) output layer, stored once in the bf16
    kernel's layout: ``linear`` multiplies by it, lookups gather each row's runs back out of the
    blocks of 4 (ChatGLM-6B ties its 130528 x 4096 output layer to the embedding)."""

    def __init__(self, linear: NativeLinear) -> None:
        super().__init__()
        self.linear = linear
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features

    @classmethod
    def replacing(cls, embedding: nn.Embedding) -> PackedEmbedding | None:
        """``embedding`` packed in place (no second copy of the table; ``embedding`` must not be
        used after), or ``None`` where the kernel does not apply or would need a padded copy."""
        weight = embedding.weight
        n, k = weight.shape
        if (weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or n % BLOCK_ROWS
                or k % BF16_K_MULTIPLE or not weight.is_contiguous() or library() is None):
            return None
        return cls(NativeLinear(weight))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        n_pad, k = self.linear.packed.shape
        # each id's whole block of 4 rows (contiguous), then that id's runs within it
        blocks = self.linear.packed.view(n_pad // BLOCK_ROWS, BLOCK_ROWS * k)
        picked = blocks.index_select(0, flat // BLOCK_ROWS).view(-1, k // 32, BLOCK_ROWS, 32)
        rows = picked.transpose(1, 2)[torch.arange(flat.numel()), flat % BLOCK_ROWS]
        return rows.reshape(*ids.shape, k)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, packed=True"
