"""ChatGLM-6B int4-qe: THUDM's layout with quantized word embeddings (and the tied lm_head)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.chatglm import load_model, read_config
from adapters.chatglm.model import QUANT_LAYOUT
from adapters.weights.checkpoint import iter_tensors
from adapters.weights.format import pack_int4_thudm, quantize_rowwise, to_thudm_layout
from adapters.weights.layers import Int4Linear, QuantizedEmbedding
from tests.conftest import checkpoint_dir

EMBEDDING = "transformer.word_embeddings.weight"


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    """An int4-qe folder written from chatglm-6b-tiny, and the same model in full precision
    with the embedding replaced by its dequantized values (the reference to compare with)."""
    source = checkpoint_dir("chatglm-6b-tiny")
    tensors = dict(iter_tensors(source))
    q, scale = quantize_rowwise(tensors[EMBEDDING], 4, QUANT_LAYOUT.arithmetic)
    qe, plain = tmp_path / "qe", tmp_path / "plain"
    for folder in (qe, plain):
        folder.mkdir()
        shutil.copy(source / "ice_text.model", folder)
        shutil.copy(source / "tokenizer_config.json", folder)
    config = json.loads((source / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps(config))
    (qe / "config.json").write_text(json.dumps(
        config | {"quantization_bit": 4, "quantization_embeddings": True}))
    dequantized = q.float() * scale.float()[:, None]
    save_file({n: (dequantized if n == EMBEDDING else t).contiguous()
               for n, t in tensors.items()}, str(plain / "model.safetensors"))
    quantized = dict(to_thudm_layout(tensors.items(), QUANT_LAYOUT, 4))
    packed = pack_int4_thudm(q)
    quantized |= {EMBEDDING: packed, EMBEDDING + "_scale": scale,
                  "lm_head.weight": packed.clone(), "lm_head.weight_scale": scale.clone()}
    save_file({n: t.contiguous() for n, t in quantized.items()}, str(qe / "model.safetensors"))
    return qe, plain


def test_int4_qe_loads_quantized_and_matches_its_dequantized_model(tmp_path: Path) -> None:
    qe, plain = _folders(tmp_path)
    model = load_model(qe, read_config(qe), dtype=torch.float32, device="cpu")
    assert isinstance(model.transformer.word_embeddings, QuantizedEmbedding)
    assert isinstance(model.lm_head, Int4Linear)
    reference = load_model(plain, read_config(plain), dtype=torch.float32, device="cpu",
                           quantize="4")
    ids = [5, 64286, 12, 74874, 130001, 130004]
    got = model.forward(ids, model.new_cache())
    want = reference.forward(ids, reference.new_cache())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert int(got.argmax()) == int(want.argmax())


def test_int4_qe_runs_on_the_bf16_kernels(tmp_path: Path) -> None:
    qe, _ = _folders(tmp_path)
    model = load_model(qe, read_config(qe), dtype=torch.bfloat16, device="cpu")
    cache = model.new_cache()
    assert torch.isfinite(model.forward([5, 6, 130001, 130004], cache)).all()
    assert torch.isfinite(model.forward([20], cache)).all()
