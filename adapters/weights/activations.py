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

from adapters.weights.layers import _WeightOnlyLinear
from adapters.weights.native import int8_act

logger = logging.getLogger(__name__)

#: Activation rows from which a layer multiplies on int8 activations.  Below it the exact
#: weight-only kernel is as fast or faster (it reads the same weights, unpacks them in the same
#: pass, and its arithmetic is not yet the bottleneck): per 6B layer, int4 0.70x at 16 rows, 0.85x
#: at 32, 1.07x at 64, 1.98x at 512 (``python -m bench.int8_kernels``, bench/README.md).
MIN_ROWS = 64


class Int8Activations:
    """A native int4 / int8 layer's weights as the int8-activation kernel takes them: the layer's
    own packed tensor (shared, not copied), its fp32 row scales and bias, and for int8 weights
    each row's sum (the kernel's unsigned-activation correction, computed once here)."""

    def __init__(self, layer: _WeightOnlyLinear, min_rows: int) -> None:
        lib = int8_act.library()
        if lib is None or not layer.native:
            raise ValueError("the int8-activation kernel needs a native int4/int8 layer")
        self.min_rows = min_rows
        self.in_features, self.out_features, self.k_pad = (
            layer.in_features, layer.out_features, layer.k_pad)
        self.packed, self.scale, self.bias = layer.packed, layer.native_scale, layer.native_bias
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
    model, torch's kernels, group-wise int4, bf16 weights) the model stays exact and a warning
    says why."""
    if int8_act.library() is None:
        logger.warning("int8 activations requested, but the int8-activation kernels are "
                       "unavailable (they need x86-64 Linux, AVX512-VNNI, a C compiler and "
                       "CHATGLM_GATEWAY_NATIVE unset); computing exactly")
        return 0
    modules = model.modules() if isinstance(model, nn.Module) else ()
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
        if isinstance(module, _WeightOnlyLinear):
            module.int8_activations = None
