"""Performance paths must compute what the paths they replace compute.

* Weight-only layers switch from the fused int8/int4 kernels to "dequantise to bf16 once + one GEMM"
  from ``DEQUANT_MIN_ROWS`` rows on (prefill): same bf16 product, same fp32 row scaling.
* ``ChatGLM2Model.forward_batch`` attends each sequence's own cache: every row must equal a solo
  ``forward`` of that sequence (different history lengths included).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from adapters.chatglm2.config import ChatGLM2Config
from adapters.chatglm2.model import ChatGLM2Model
from adapters.weights import layers
from adapters.weights.format import quantize_rowwise
from adapters.weights.layers import (
    DEQUANT_MIN_ROWS,
    Int4Linear,
    Int8Linear,
    int4_cpu_block,
    quantize_weight,
    unpack_int4_cpu,
)


def _layer(bits: int, out_f: int, in_f: int, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    bias = torch.randn(out_f, generator=gen)
    # torch's kernels (the native int4 kernel has its own tests: tests/test_native_kernel.py)
    return quantize_weight(w, str(bits), bias, kernel=True, native_kernel=False)


def test_int4_cpu_layout_is_known() -> None:
    # Without it int4 prefill silently keeps the slow path: this CPU must have a known layout.
    assert int4_cpu_block() in (64, 32)


@pytest.mark.parametrize("block", [64, 32])
def test_unpack_int4_cpu_inverts_the_documented_layout(block: int) -> None:
    n, k = 2 * block, 8
    u = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    half = block // 2
    blocks = u.view(n // block, block, k)
    packed = (blocks[:, :half] | (blocks[:, half:] << 4)).transpose(1, 2).contiguous()
    wt = unpack_int4_cpu(packed.view(n, k // 2), n, k, block)
    assert wt.dtype == torch.bfloat16 and wt.shape == (k, n)
    assert torch.equal(wt.T.to(torch.int16) + 8, u.to(torch.int16))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("extra_rows", [0, 37])
@pytest.mark.parametrize("chunk", [None, 64 * 256])
def test_dequant_gemm_path_equals_kernel_path(bits: int, extra_rows: int, chunk: int | None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk is not None:  # several weight chunks of 64 rows (the last one shorter for 200 rows)
        monkeypatch.setattr(layers, "_DEQUANT_CHUNK_ELEMENTS", chunk)
    layer = _layer(bits, 200 if bits == 8 else 192, 256)
    assert isinstance(layer, (Int4Linear, Int8Linear)) and layer.kernel
    assert layer.dequant_min_rows == DEQUANT_MIN_ROWS[f"int{bits}"]
    rows = layer.dequant_min_rows + extra_rows
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert layer.k_pad == 256
    via_gemm = layer._dequant_matmul(x)
    assert via_gemm is not None, "the fast path must exist for this layer"
    via_kernel = layer._kernel_matmul(x)
    # Both are the bf16-rounded product of the same bf16 operands (only the summation order
    # differs), scaled in fp32: a bf16 ulp or two apart at most.
    tol = 2**-7 * via_kernel.abs().amax(dim=-1, keepdim=True)
    assert torch.all((via_gemm - via_kernel).abs() <= tol)
    # and forward takes the GEMM path at this size
    assert torch.equal(layer(x), (via_gemm + layer.bias.float()).to(x.dtype))


def test_decode_sized_calls_keep_the_kernel() -> None:
    layer = _layer(4, 64, 128)
    x = torch.randn(layer.dequant_min_rows - 1, 128).to(torch.bfloat16)
    assert torch.equal(layer(x), (layer._kernel_matmul(x) + layer.bias.float()).to(x.dtype))


def test_groupwise_int4_keeps_the_kernel() -> None:
    layer = quantize_weight(torch.randn(64, 256) * 0.05, "int4-g128", kernel=True)
    assert layer._dequant_matmul(torch.randn(layer.dequant_min_rows, 256).to(torch.bfloat16)) is None


def test_odd_shapes_fall_back_to_the_kernel() -> None:
    # 80 output rows is not a whole number of packing blocks: no dequant path, same result.
    q, scale = quantize_rowwise(torch.randn(80, 64), 4)
    layer = Int4Linear(q, scale[:, None], group_size=64, kernel=True, native_kernel=False)
    x = torch.randn(layer.dequant_min_rows, 64).to(torch.bfloat16)
    assert layer._dequant_matmul(x) is None
    assert torch.equal(layer(x), layer._kernel_matmul(x).to(x.dtype))


_TINY = ChatGLM2Config(
    padded_vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16,
    multi_query_attention=True, multi_query_group_num=2, ffn_hidden_size=96, add_qkv_bias=True,
    add_bias_linear=False, rmsnorm=True, post_layer_norm=True, layernorm_epsilon=1e-5,
    seq_length=256, eos_token_id=2, pad_token_id=0, torch_dtype="float32",
    apply_residual_connection_post_layernorm=False,
)


def _tiny_model(dtype: torch.dtype, cfg: ChatGLM2Config = _TINY) -> ChatGLM2Model:
    torch.manual_seed(0)
    model = ChatGLM2Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.2)
    model.to(dtype)
    model.finish_loading(dtype, torch.device("cpu"))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("multi_query", [True, False])
def test_forward_batch_rows_equal_solo_forward(dtype: torch.dtype, multi_query: bool) -> None:
    cfg = dataclasses.replace(_TINY, multi_query_attention=multi_query)
    model = _tiny_model(dtype, cfg)
    prompts = [[5, 6, 7], list(range(10, 80)), [9], list(range(20, 45))]
    solo, batched = [], []
    for p in prompts:
        a, b = model.new_cache(), model.new_cache()
        model.forward(p, a)
        model.forward(p, b)
        solo.append(a)
        batched.append(b)
    for step in range(3):  # histories of different lengths, growing past a cache reallocation
        ids = [[40 + step + i] for i in range(len(prompts))]
        rows = model.forward_batch(ids, batched)
        for i, cache in enumerate(solo):
            expected = model.forward(ids[i], cache)
            scale = expected.abs().max().item()  # summation order differs: fp32 noise only
            tol = (1e-4 if dtype == torch.float32 else 2e-2) * scale
            assert torch.allclose(rows[i], expected, atol=tol, rtol=0), (step, i)


@pytest.mark.parametrize("start", [0, 7])
def test_every_position_rows_equal_one_id_at_a_time(start: int) -> None:
    """``forward(..., every_position=True)`` (prompt logprobs, draft verification) gives row by
    row the logits one-at-a-time decoding would."""
    model = _tiny_model(torch.float32)
    ids = list(range(20, 32))
    together, stepwise = model.new_cache(), model.new_cache()
    if start:
        model.forward(ids[:start], together)
        model.forward(ids[:start], stepwise)
    rows = model.forward(ids[start:], together, every_position=True)
    assert rows.shape == (len(ids) - start, _TINY.padded_vocab_size)
    for i, token in enumerate(ids[start:]):
        expected = model.forward([token], stepwise)
        assert torch.allclose(rows[i], expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    assert together.length == stepwise.length == len(ids)
