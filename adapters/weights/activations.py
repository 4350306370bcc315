"""The opt-in int8-activation path (``--int8-activations``): layers with int4 / int8 weights
quantise the activations of large calls (prefill chunks, large decode batches) per token to int8
and multiply on AVX512-VNNI (:mod:`adapters.weights.native.int8_act`).

Not exact: every activation row is rounded to 8 bits (``scale = max|x| / 127``), as llama.cpp does
for its quantised formats.  The default (off) keeps THUDM's numerics; the measured effect on the
logits is in the README ("Performance") and ``python -m bench.int8_quality``.  Calls with fewer
than ``min_rows`` rows (decoding a few sequences: bound by reading the weights, not by
multiplying) keep the exact path, so a short answer's tokens after the prompt are computed
exactly; only a prompt's prefill and decode batches of ``min_rows`` or more sequences change.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from adapters.weights import native
from adapters.weights.format import quantize_rowwise
from adapters.weights.layers import _WeightOnlyLinear
from adapters.weights.native import int8_act

logger = logging.getLogger(__name__)

#: Activation rows from which a layer multiplies on int8 activations.  Below it the exact
#: weight-only kernel is as fast or faster (it reads the same weights, unpacks them in the same
#: pass, and its arithmetic is not yet the bottleneck): per 6B layer, int4 0.70x at 16 rows, 0.85x
#: at 32, 1.07x at 64, 1.98x at 512 (``python -m bench.int8_kernels``, bench/README.md).
MIN_ROWS = 64


class Int8Activations:
    """A layer's weights as the int8-activation kernel takes them: a native int4 / int8 layer's
    own packed tensor (shared, not copied), or a bf16 layer's weights quantised once per row to
    int8 (:meth:`of_bf16`); fp32 row scales and bias, and for int8 weights each row's sum (the
    kernel's unsigned-activation correction, computed once here)."""

    def __init__(self, layer: _WeightOnlyLinear, min_rows: int) -> None:
        if int8_act.library() is None or not layer.native:
            raise ValueError("the int8-activation kernel needs a native int4/int8 layer")
        self._take(layer.in_features, layer.out_features, layer.k_pad, layer.packed,
                   layer.native_scale, layer.native_bias, min_rows)

    @classmethod
    def of_bf16(cls, linear: native.NativeLinear, min_rows: int) -> Int8Activations:
        """A bf16 layer's int8 twin: each weight row quantised symmetrically to int8 (``scale =
        max|w| / 127``, THUDM's int8 rounding computed in fp32), kept beside the bf16 weights
        (which decoding still reads: +50 % of the layer's bytes)."""
        if int8_act.library() is None:
            raise ValueError("the int8-activation kernel is unavailable")
        self = cls.__new__(cls)
        weight = linear.plain_weight()
        q, scale = quantize_rowwise(weight.float(), 8, arithmetic=torch.float32)
        n, k = weight.shape
        n_pad = -(-n // native.BLOCK_ROWS) * native.BLOCK_ROWS
        k_pad = -(-k // native.K_MULTIPLE) * native.K_MULTIPLE
        padded_scale = torch.zeros(n_pad)
        padded_scale[:n] = scale.float()
        self._take(k, n, k_pad, native.pack_int8(q, n_pad, k_pad), padded_scale, linear.bias,
                   min_rows)
        return self

    def _take(self, in_features: int, out_features: int, k_pad: int, packed: torch.Tensor,
              scale: torch.Tensor, bias: torch.Tensor | None, min_rows: int) -> None:
        lib = int8_act.library()
        assert lib is not None
        self.min_rows = min_rows
        self.in_features, self.out_features, self.k_pad = in_features, out_features, k_pad
        self.packed, self.scale, self.bias = packed, scale, bias
        self.wsum = (int8_act.weight_row_sums(lib, self.packed)
                     if self.packed.dtype == torch.int8 else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, in]`` -> ``[M, out]`` (bf16 for bf16 ``x``, else fp32)."""
        lib = int8_act.library()
        assert lib is not None
        xb = x.to(torch.bfloat16).contiguous()
        rows = int8_act.quantize_rows(lib, xb, self.k_pad, plus128=self.wsum is not None)
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        y = int8_act.gemm(lib, rows, self.packed, self.scale, self.bias, self.wsum, out_dtype)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]


def enable_int8_activations(model: object, min_rows: int = MIN_ROWS) -> int:
    """Put every int4 / int8 layer of ``model`` that runs on the native kernels on the
    int8-activation path for calls of at least ``min_rows`` rows; returns how many.  Where the
    kernel cannot run (no AVX512-VNNI, ``CHATGLM_GATEWAY_NATIVE=0``, no native layers: a float32
    model, torch's kernels, group-wise int4) the model stays exact and a warning says why.  The
    bf16 layer linears on the native kernel get an int8 copy of their weights (one scale a row)."""
    if int8_act.library() is None:
        logger.warning("int8 activations requested, but the int8-activation kernels are "
                       "unavailable (they need x86-64 Linux, AVX512-VNNI, a C compiler and "
                       "CHATGLM_GATEWAY_NATIVE unset); computing exactly")
        return 0
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    # bf16 weights: the layers' own linears (not the output layer: its calls have one row per
    # sequence or prompt, never min_rows)
    bf16 = [m for m in modules if isinstance(m, native.NativeLinear) and m.layer_linear]
    for linear in bf16:
        linear.int8_activations = Int8Activations.of_bf16(linear, min_rows)
    if bf16:
        logger.info("int8 activations on %d bf16 layers (weights quantised per row at load), "
                    "for calls of %d rows or more", len(bf16), min_rows)
        return len(bf16)
    layers = [m for m in modules if isinstance(m, _WeightOnlyLinear)]
    native_layers = [m for m in layers if m.native]
    for layer in native_layers:
        layer.int8_activations = Int8Activations(layer, min_rows)
    if len(native_layers) < len(layers) or not native_layers:
        logger.warning("int8 activations: %d of %d quantised layers qualify (they need int4/int8 "
                       "per-row weights on the native kernels, bf16 or fp16 compute); the rest "
                       "compute exactly", len(native_layers), len(layers))
    else:
        logger.info("int8 activations on %d layers, for calls of %d rows or more",
                    len(native_layers), min_rows)
    return len(native_layers)


def disable_int8_activations(model: nn.Module) -> None:
    """Back to the exact path (benchmarks and quality checks compare both on one model)."""
    for module in model.modules():
        if isinstance(module, (_WeightOnlyLinear, native.NativeLinear)):
            module.int8_activations = None
