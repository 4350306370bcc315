"""A sequence's logits, bit for bit, do not depend on what it is computed with (native kernels).

In bf16 on a CPU with the native kernels every weight format (bf16, int8, int4) and both families
compute each row of a linear, and each query of attention, in an order fixed by that row alone.
So, exactly:

* every row of ``forward_batch`` equals a solo ``forward`` of that sequence;
* a prompt prefilled in chunks (wherever the engine cut it: the room left by other prompts in the
  step) gives the logits of the prompt prefilled whole, and of decoding it one id at a time.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapters.chatglm.config import ChatGLMConfig
from adapters.chatglm.model import ChatGLMModel
from adapters.chatglm2.config import ChatGLM2Config
from adapters.chatglm2.model import QUANT_LAYOUT as V2_LAYOUT
from adapters.chatglm2.model import ChatGLM2Model
from adapters.weights import native
from adapters.weights.layers import Int4Linear, Int8Linear, quantize_weight

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="native kernels unavailable (x86-64 Linux, AVX512-BF16 and "
    "a C compiler) or switched off with CHATGLM_GATEWAY_NATIVE=0")

V2 = ChatGLM2Config(
    padded_vocab_size=256, hidden_size=128, num_layers=2, num_attention_heads=4, kv_channels=32,
    multi_query_attention=True, multi_query_group_num=2, ffn_hidden_size=192, add_qkv_bias=True,
    add_bias_linear=False, rmsnorm=True, post_layer_norm=True, layernorm_epsilon=1e-5,
    seq_length=256, eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16",
    apply_residual_connection_post_layernorm=False,
)
V1 = ChatGLMConfig(
    vocab_size=300, hidden_size=128, num_layers=2, num_attention_heads=4, inner_hidden_size=256,
    max_sequence_length=256, bos_token_id=204, eos_token_id=205, mask_token_id=200,
    gmask_token_id=201, pad_token_id=3,
)


def _random_bf16(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm.weight" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, 0.1)
    model.to(torch.bfloat16)


def _quantize(model: ChatGLM2Model, mode: str) -> None:
    """The four linears of every layer quantised as the loader does (native int8/int4 kernels)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and V2_LAYOUT.covers(name):
            bias = None if module.bias is None else module.bias.detach()
            layer = quantize_weight(module.weight.detach().float(), mode, bias, kernel=True,
                                    native_kernel=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)


def v2_model(weights: str, cfg: ChatGLM2Config = V2) -> ChatGLM2Model:
    model = ChatGLM2Model(cfg)
    _random_bf16(model)
    if weights != "bf16":
        _quantize(model, weights)
    model.finish_loading(torch.bfloat16, torch.device("cpu"))
    linear = model.transformer.encoder.layers[0].mlp.dense_4h_to_h
    kind = {"bf16": native.NativeLinear, "4": Int4Linear, "8": Int8Linear}[weights]
    assert isinstance(linear, kind) and getattr(linear, "native", True)
    return model


def v1_model() -> ChatGLMModel:
    model = ChatGLMModel(V1)
    _random_bf16(model)
    model.finish_loading(torch.bfloat16, torch.device("cpu"))
    assert isinstance(model.transformer.layers[0].mlp.dense_h_to_4h, native.NativeLinear)
    assert isinstance(model.transformer.word_embeddings, native.PackedEmbedding)
    return model


def _batched_equals_solo(model: ChatGLM2Model | ChatGLMModel, prompts: list[list[int]],
                         steps: int) -> None:
    solo = [model.new_cache() for _ in prompts]
    batched = [model.new_cache() for _ in prompts]
    for p, a, b in zip(prompts, solo, batched, strict=True):
        assert torch.equal(model.forward(p, a), model.forward(p, b))
    for step in range(steps):
        ids = [[30 + (7 * step + 3 * i) % 90] for i in range(len(prompts))]
        rows = model.forward_batch(ids, batched)
        for i, cache in enumerate(solo):
            assert torch.equal(rows[i], model.forward(ids[i], cache)), (step, i)


@pytest.mark.parametrize("weights", ["bf16", "8", "4"])
def test_v2_batched_rows_equal_solo_rows(weights: str) -> None:
    model = v2_model(weights)
    # histories of different lengths, past the caches' first reallocation (64 positions)
    _batched_equals_solo(model, [[5, 6, 7], list(range(10, 60)), [9]], steps=20)


@pytest.mark.parametrize("weights", ["bf16", "8", "4"])
@pytest.mark.parametrize("kv_channels", [32, 16])  # 16: the attention kernels' half vector
def test_v2_chunked_prefill_equals_whole_and_stepwise(weights: str, kv_channels: int) -> None:
    model = v2_model(weights, dataclasses.replace(V2, kv_channels=kv_channels))
    ids = [(11 * i) % 250 + 3 for i in range(70)]
    whole = model.forward(ids, model.new_cache(), every_position=True)
    cache = model.new_cache()
    # the cuts an engine step makes when other prompts took part of the chunk's room
    parts = [model.forward(ids[a:b], cache, every_position=True)
             for a, b in ((0, 5), (5, 6), (6, 40), (40, 70))]
    assert torch.equal(torch.cat(parts), whole)
    step_cache = model.new_cache()
    stepwise = torch.stack([model.forward([i], step_cache) for i in ids])
    assert torch.equal(stepwise, whole)


def test_v1_batched_rows_equal_solo_rows() -> None:
    g, s = V1.gmask_token_id, V1.bos_token_id
    prompts = [[5, 6, 7, g, s], [*range(10, 60), g, s], [9, g, s]]
    _batched_equals_solo(v1_model(), prompts, steps=20)


def test_v1_native_attention_is_thudms() -> None:
    """ChatGLM-6B's attention on the kernel (prefix-LM prompt: the context bidirectional) against
    the torch code written from THUDM's ``attention_fn``: the same bf16 roundings, so all but
    rare last-bit differences of a summation order vanish."""
    model = v1_model()
    g, s = V1.gmask_token_id, V1.bos_token_id
    ids = [*range(20, 50), g, s]
    native_cache = model.new_cache()
    native_rows = [model.forward(ids, native_cache)]
    native_rows += [model.forward([i], native_cache) for i in (40, 41, 42)]
    model._attention = None  # the torch path
    torch_cache = model.new_cache()
    torch_rows = [model.forward(ids, torch_cache)]
    torch_rows += [model.forward([i], torch_cache) for i in (40, 41, 42)]
    for a, b in zip(native_rows, torch_rows, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=2**-6 * b.abs().max().item())
        assert a.argmax() == b.argmax()
