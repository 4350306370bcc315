"""Weight-only int8/int4 layers: THUDM's layout and rounding, and lossless kernel repacking.

"Lossless" is checked as: the layer's weight as the kernel sees it (the kernel applied to the
identity matrix, see ``dequantize``) equals THUDM's dequantised weight ``q * scale`` computed in
fp32, element for element (``torch.equal``).  For group-wise int4 the kernel's bf16 output of the
identity equals ``(q * scale)`` rounded to bf16 (the kernel holds bf16-exact group scales).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from adapters.registry import FAMILIES
from adapters.weights.checkpoint import CheckpointError, iter_tensors
from adapters.weights.format import (
    QUANT_SCHEMES,
    pack_int4_thudm,
    quantize_groupwise,
    quantize_rowwise,
    to_thudm_layout,
    unpack_int4_thudm,
)
from adapters.weights.layers import (
    Int4Linear,
    Int8Linear,
    from_thudm,
    kernel_available,
    quantize_weight,
)
from tests.conftest import checkpoint_dir, oracle

logger = logging.getLogger(__name__)


def thudm_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM quantization.py, QuantizedLinear.__init__, verbatim on the fp16 weight."""
    weight = weight.half()
    weight_scale = weight.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)
    weight = torch.round(weight / weight_scale[:, None]).to(torch.int8)
    return weight, weight_scale


def thudm_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def heavy_tailed(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """Weights like a trained LLM's: mostly small, a few large outliers per row."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    outliers = torch.rand(out_f, in_f, generator=gen) < 0.01
    return torch.where(outliers, w * 20, w).half()


# --------------------------------------------------------------------------- THUDM format


def test_pack_layout_even_column_in_high_nibble() -> None:
    q = torch.tensor([[-7, 7, 3, -1, 0, -8]], dtype=torch.int8)
    packed = pack_int4_thudm(q)
    # (-7 << 4) | 7 = 0x97 = -105 as int8; (3 << 4) | 0xF = 0x3F = 63; (0 << 4) | 8 = 8
    assert packed.tolist() == [[-105, 63, 8]]
    assert torch.equal(unpack_int4_thudm(packed), q)


def test_pack_unpack_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (37, 130), generator=gen, dtype=torch.int8)
    assert torch.equal(unpack_int4_thudm(pack_int4_thudm(q)), q)
    b = torch.randint(-128, 128, (5, 9), generator=gen, dtype=torch.int8)
    assert torch.equal(pack_int4_thudm(unpack_int4_thudm(b)), b)


def test_pack_rejects_odd_columns() -> None:
    with pytest.raises(ValueError):
        pack_int4_thudm(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_quantize_rowwise_matches_thudm(bits: int, dtype: torch.dtype) -> None:
    # 4100 rows: more than one internal row block.
    w = heavy_tailed(4100, 72, seed=bits).to(dtype)
    q, scale = quantize_rowwise(w, bits)
    ref_q, ref_scale = thudm_quantize(w, bits)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q, ref_q)
    assert q.abs().max() == 2 ** (bits - 1) - 1


def test_quantize_rowwise_rounds_in_fp16_like_thudm() -> None:
    # THUDM rounds w / scale to fp16 before torch.round: ties created by that rounding must match.
    w = heavy_tailed(512, 256, seed=7)
    q, scale = quantize_rowwise(w, 4)
    fp32_q = torch.round(w.float() / scale.float()[:, None]).to(torch.int8)
    differs = (q != fp32_q).sum().item()
    logger.info("elements where fp16 vs fp32 division round differently: %d", differs)
    assert differs > 0  # this weight does distinguish the two roundings
    assert torch.equal(q, thudm_quantize(w, 4)[0])


def test_quantize_rowwise_zero_row() -> None:
    w = torch.zeros(2, 8, dtype=torch.float16)
    w[1, 3] = 1.0
    q, scale = quantize_rowwise(w, 8)
    assert q[0].abs().sum() == 0 and scale[0] == 0
    assert q[1, 3] == 127


def test_quantize_groupwise_scales_are_bf16_exact() -> None:
    w = heavy_tailed(64, 300, seed=3)
    q, scales = quantize_groupwise(w, 128)
    assert scales.shape == (64, 3)
    assert torch.equal(scales, scales.to(torch.bfloat16).float())
    assert q.abs().max() <= 7
    # every group reaches (about) its absmax: the scale is absmax / 7 up to bf16 rounding
    dq = q.float() * scales.repeat_interleave(128, dim=1)[:, :300]
    assert (dq - w.float()).abs().max() <= scales.max() / 2 * 1.01


# --------------------------------------------------------------------------- layers


def test_kernels_available_on_cpu() -> None:
    # This suite must exercise the kernel path, not only the fallback.
    assert kernel_available("int8", "cpu")
    assert kernel_available("int4", "cpu")


@pytest.mark.parametrize("kernel", [True, False])
def test_int8_dequantizes_exactly(kernel: bool) -> None:
    q, scale = quantize_rowwise(heavy_tailed(48, 40, seed=4), 8)
    layer = Int8Linear(q, scale, kernel=kernel)
    assert layer.kernel is kernel
    ident = torch.eye(40)
    # through the kernel path: x = I gives W.T (bf16 output of q is exact, scale applied in fp32)
    assert torch.equal(layer(ident).T, thudm_dequant(q, scale))
    assert torch.equal(layer.dequantize(), thudm_dequant(q, scale))


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("shape", [(48, 64), (24, 216), (272, 96), (64, 256)])
def test_int4_per_row_dequantizes_exactly(kernel: bool, shape: tuple[int, int]) -> None:
    # (24, 216): N and K both need padding (N % 16, K % 32); 216 is the fixtures' ffn width.
    q, scale = quantize_rowwise(heavy_tailed(*shape, seed=5), 4)
    layer = Int4Linear(q, scale[:, None], group_size=shape[1], kernel=kernel)
    assert layer.kernel is kernel
    assert torch.equal(layer.dequantize(), thudm_dequant(q, scale))
    assert torch.equal(layer(torch.eye(shape[1])).T, thudm_dequant(q, scale))


def test_int4_groupwise_kernel_identity_is_bf16_rounded_weight() -> None:
    q, scales = quantize_groupwise(heavy_tailed(64, 256, seed=6), 128)
    layer = Int4Linear(q, scales, group_size=128)
    assert layer.kernel
    exact = q.float() * scales.repeat_interleave(128, dim=1)
    assert torch.equal(layer.dequantize(), exact.to(torch.bfloat16).float())
    fallback = Int4Linear(q, scales, group_size=128, kernel=False)
    assert torch.equal(fallback.dequantize(), exact)


@pytest.mark.parametrize("mode", sorted(QUANT_SCHEMES))
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_outputs_close_to_dequantized_reference(mode: str, x_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(8)
    w = heavy_tailed(80, 216, seed=9)
    bias = (torch.randn(80, generator=gen) * 0.1).half()
    layer = quantize_weight(w, mode, bias)
    x = torch.randn(2, 3, 216, generator=gen).to(x_dtype)
    y = layer(x)
    assert y.shape == (2, 3, 80) and y.dtype == x_dtype
    ref = x.double() @ exact_weight(w, mode).T + bias.double()
    # bf16 kernel: activations and output rounded to bf16 (2^-8 relative each)
    tol = 2**-7 * ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= tol


def exact_weight(w: torch.Tensor, mode: str) -> torch.Tensor:
    """The dequantised weight each mode defines, computed independently of the layers."""
    if mode == "int4-g128":
        q, scales = quantize_groupwise(w, 128)
        return q.double() * scales.double().repeat_interleave(128, dim=1)[:, : w.shape[1]]
    q, scale = thudm_quantize(w, QUANT_SCHEMES[mode].bits)
    return thudm_dequant(q, scale).double()


def test_kernel_and_fallback_agree() -> None:
    gen = torch.Generator().manual_seed(10)
    w = heavy_tailed(64, 128, seed=11)
    x = torch.randn(5, 128, generator=gen)
    for bits in (8, 4):
        q, scale = quantize_rowwise(w, bits)
        fast = from_thudm(q if bits == 8 else pack_int4_thudm(q), scale, bits)
        assert fast.kernel
        if bits == 8:
            slow: nn.Module = Int8Linear(q, scale, kernel=False)
        else:
            slow = Int4Linear(q, scale[:, None], group_size=128, kernel=False)
        ref = slow(x)
        assert torch.allclose(fast(x), ref, rtol=0, atol=2**-7 * ref.abs().max().item())


def test_groupwise_more_accurate_than_per_row() -> None:
    w = heavy_tailed(512, 1024, seed=12)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(16, 1024, generator=gen)
    ref = x.double() @ w.double().T
    errors = {}
    for mode in ("8", "4", "int4-g128"):
        y = quantize_weight(w, mode)(x)
        errors[mode] = ((y.double() - ref).norm() / ref.norm()).item()
    logger.info("relative output error vs fp16 weights: %s", errors)
    assert errors["int4-g128"] < errors["4"]
    assert errors["8"] < errors["int4-g128"]


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Module:
    with torch.no_grad():
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return quantize_weight(linear.weight.detach(), mode, bias)


def test_quantize_weight_replaces_nn_linear() -> None:
    torch.manual_seed(14)
    linear = nn.Linear(64, 48, bias=True).half()
    for mode in QUANT_SCHEMES:
        layer = quantize_linear(linear, mode)
        assert (layer.in_features, layer.out_features) == (64, 48)
        x = torch.randn(3, 64)
        with torch.no_grad():
            ref = nn.functional.linear(x, linear.weight.float(), linear.bias.float())
        assert (layer(x) - ref).abs().max() < 0.1 * ref.abs().max()
    q, scale = quantize_rowwise(linear.weight.detach(), 4)
    layer4 = quantize_linear(linear, "4")
    assert torch.equal(layer4.dequantize(), thudm_dequant(q, scale))
    with pytest.raises(ValueError):
        quantize_linear(linear, "3")


def is_quantized_linear(name: str, family: str) -> bool:
    return FAMILIES[family].quant_layout.covers(name)


def test_is_quantized_linear_per_family() -> None:
    assert is_quantized_linear("transformer.layers.0.attention.query_key_value", "chatglm")
    assert is_quantized_linear("transformer.layers.27.mlp.dense_4h_to_h.weight_scale", "chatglm")
    assert is_quantized_linear("transformer.layers.3.attention.dense.bias", "chatglm")
    assert not is_quantized_linear("transformer.word_embeddings.weight", "chatglm")
    assert not is_quantized_linear("transformer.layers.0.input_layernorm.weight", "chatglm")
    name = "transformer.encoder.layers.1.self_attention.query_key_value.weight"
    assert is_quantized_linear(name, "chatglm2") and is_quantized_linear(name, "chatglm3")
    assert not is_quantized_linear(name, "chatglm")
    assert not is_quantized_linear("transformer.output_layer.weight", "chatglm2")
    with pytest.raises(KeyError):
        is_quantized_linear(name, "llama")


# --------------------------------------------------------------------------- THUDM fixtures


FIXTURES = [("chatglm2-6b-int8-tiny", "chatglm2", 8), ("chatglm-6b-int4-tiny", "chatglm", 4)]


def quantized_linears(folder, family: str) -> dict[str, dict[str, torch.Tensor]]:
    linears: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in iter_tensors(folder):
        if is_quantized_linear(name, family):
            module, _, part = name.rpartition(".")
            linears.setdefault(module, {})[part] = tensor
    return linears


@pytest.mark.parametrize(("name", "family", "bits"), FIXTURES)
def test_thudm_fixture_dequantizes_through_kernel_exactly(
    name: str, family: str, bits: int
) -> None:
    linears = quantized_linears(checkpoint_dir(name), family)
    assert len(linears) == 8  # 2 layers x 4 linears
    for module, parts in linears.items():
        weight, scale = parts["weight"], parts["weight_scale"]
        q = weight if bits == 8 else unpack_int4_thudm(weight)
        layer = from_thudm(weight, scale, bits, parts.get("bias"))
        assert layer.kernel, module
        expected = thudm_dequant(q, scale)
        assert torch.equal(layer.dequantize(), expected), module
        if "bias" in parts:
            x = torch.zeros(1, q.shape[1])
            assert torch.equal(layer(x)[0], parts["bias"].float()), module


@pytest.mark.parametrize(("name", "family", "bits"), FIXTURES)
def test_thudm_fixture_layout_check(name: str, family: str, bits: int) -> None:
    check = oracle(name)["quantization"]["layout_check"]
    tensors = dict(iter_tensors(checkpoint_dir(name)))
    weight = tensors[check["tensor"]]
    scale = tensors[check["tensor"].removesuffix("weight") + "weight_scale"]
    assert list(weight.shape) == check["packed_shape"]
    assert weight[0, :8].tolist() == check["first_row_first_8_bytes"]
    q = weight if bits == 8 else unpack_int4_thudm(weight)
    assert q[0, :16].tolist() == check["first_row_first_16_values_decoded"]
    assert scale[0].item() == check["scale_row0"]
    layer = from_thudm(weight, scale, bits)
    assert layer.dequantize()[0, :8].tolist() == check["dequant_row0_first_8"]


# --------------------------------------------------------------------------- model loading


def load_family(family: str, folder: Path, dtype: torch.dtype = torch.float32, quantize=None):
    """Read config + load a model folder through the family's loader (chatglm or chatglm2)."""
    if family == "chatglm":
        from adapters.chatglm.config import read_config as read_v1
        from adapters.chatglm.model import load_model as load_v1

        return load_v1(folder, read_v1(folder), dtype=dtype, device="cpu", quantize=quantize)
    from adapters.chatglm2.config import read_config as read_v2
    from adapters.chatglm2.model import load_model as load_v2

    return load_v2(folder, read_v2(folder), dtype=dtype, device="cpu", quantize=quantize)


def first_token_errors(model, reference: dict) -> tuple[float, int]:
    """(max |logprob - reference logprob| over every case's top-10, cases with the same first
    greedy token)."""
    worst, same = 0.0, 0
    for case in reference["cases"]:
        logits = model.forward(case["inputs"]["input_ids"][0], model.new_cache()).double()
        logprobs = logits - torch.logsumexp(logits, 0)
        top, lse = case["last_logits_topk"], case["last_logits_stats"]["logsumexp"]
        for token, value in zip(top["ids"], top["values"], strict=True):
            worst = max(worst, abs(logprobs[token].item() - (value - lse)))
        same += int(logits.argmax()) == case["greedy_new_ids"][0]
    return worst, same


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Int8Linear | Int4Linear)]


@pytest.mark.parametrize(("name", "family", "bits"), FIXTURES)
def test_prequantized_fixture_matches_oracle(name: str, family: str, bits: int) -> None:
    reference = oracle(name)
    model = load_family(family, checkpoint_dir(name))
    layers = quantized_layers(model)
    assert len(layers) == 8 and all(not layer.kernel for layer in layers)  # fp32: exact path
    worst, same = first_token_errors(model, reference)
    assert worst < 1e-3
    assert same == len(reference["cases"])


@pytest.mark.parametrize(("name", "family", "bits"), FIXTURES)
def test_prequantized_fixture_bf16_kernels(name: str, family: str, bits: int) -> None:
    model = load_family(family, checkpoint_dir(name), torch.bfloat16)
    layers = quantized_layers(model)
    assert len(layers) == 8 and all(layer.kernel for layer in layers)
    worst, _ = first_token_errors(model, oracle(name))
    # bf16 activations: the unquantised bf16 models are up to ~1.2 off on these fixtures
    logger.info("%s bf16 kernels: max |dlogprob| %.4f", name, worst)
    assert worst < 1.5


def test_quantize_on_load_8_reproduces_thudm_int8_folder() -> None:
    # chatglm2-6b-int8-tiny is THUDM's quantize(8) of chatglm2-6b-tiny: quantising on load must
    # give the same model, hence the int8 oracle's numbers.
    fp16 = checkpoint_dir("chatglm2-6b-tiny")
    on_load = load_family("chatglm2", fp16, quantize="8")
    prequantized = load_family("chatglm2", checkpoint_dir("chatglm2-6b-int8-tiny"))
    ids = oracle("chatglm2-6b-int8-tiny")["cases"][0]["inputs"]["input_ids"][0]
    a = on_load.forward(ids, on_load.new_cache())
    b = prequantized.forward(ids, prequantized.new_cache())
    assert torch.equal(a, b)


def test_quantize_on_load_4_reproduces_thudm_chatglm_6b_int4_folder() -> None:
    # chatglm-6b-int4-tiny is THUDM's quantize(4) of chatglm-6b-tiny, computed in float32 with
    # the unrounded scale (QuantLayout.arithmetic): every packed weight and scale must be equal.
    from adapters.weights.checkpoint import iter_tensors

    fp = dict(iter_tensors(checkpoint_dir("chatglm-6b-tiny")))
    stored = dict(iter_tensors(checkpoint_dir("chatglm-6b-int4-tiny")))
    rewritten = dict(to_thudm_layout(fp.items(), FAMILIES["chatglm"].quant_layout, 4))
    quantized = [n for n in stored if n.endswith("weight_scale")]
    assert len(quantized) == 8
    for name in quantized:
        weight = name.removesuffix("_scale")
        assert torch.equal(rewritten[name], stored[name]), name
        assert torch.equal(rewritten[weight], stored[weight]), weight
    on_load = load_family("chatglm", checkpoint_dir("chatglm-6b-tiny"), quantize="4")
    prequantized = load_family("chatglm", checkpoint_dir("chatglm-6b-int4-tiny"))
    ids = oracle("chatglm-6b-int4-tiny")["cases"][0]["inputs"]["input_ids"][0]
    assert torch.equal(on_load.forward(ids, on_load.new_cache()),
                       prequantized.forward(ids, prequantized.new_cache()))


@pytest.mark.parametrize(
    ("family", "name", "int_reference"),
    [
        ("chatglm2", "chatglm2-6b-tiny", "chatglm2-6b-int8-tiny"),
        ("chatglm", "chatglm-6b-tiny", "chatglm-6b-int4-tiny"),
    ],
)
def test_quantize_on_load_accuracy(family: str, name: str, int_reference: str) -> None:
    """Figures for the report (logged); asserts only what holds for every mode."""
    reference = oracle(name)
    folder = checkpoint_dir(name)
    errors = {}
    for mode in ("8", "4", "int4-g128"):
        model = load_family(family, folder, quantize=mode)
        assert len(quantized_layers(model)) == 8
        errors[mode] = first_token_errors(model, reference)
    logger.info("%s quantised on load vs fp oracle (max |dlogprob|, same first): %s", name, errors)
    assert errors["8"][0] < errors["4"][0]
    bits = 8 if "int8" in int_reference else 4
    worst, same = first_token_errors(
        load_family(family, folder, quantize=str(bits)), oracle(int_reference)
    )
    logger.info(
        "%s quantize=%d vs %s oracle: %.4f, %d same", name, bits, int_reference, worst, same
    )
    assert same == len(oracle(int_reference)["cases"])


# --------------------------------------------------------------------------- self-made folders


@pytest.fixture(scope="module")
def v2_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random ChatGLM2 folder (biases everywhere, K = 40 needs kernel padding) and its
    THUDM int4 / int8 versions."""
    from tests.test_chatglm2_model import VARIANT_CONFIG, random_state_dict, write_checkpoint

    root = tmp_path_factory.mktemp("quant")
    sd = random_state_dict(VARIANT_CONFIG, seed=3)
    folders = {"fp16": write_checkpoint(root / "fp16", VARIANT_CONFIG, sd, "safetensors")}
    for bits in (4, 8):
        qsd = dict(to_thudm_layout(sd.items(), FAMILIES["chatglm2"].quant_layout, bits))
        cfg = VARIANT_CONFIG | {"quantization_bit": bits}
        folders[str(bits)] = write_checkpoint(root / f"int{bits}", cfg, qsd, "bin")
    return folders


@pytest.mark.parametrize("bits", ["4", "8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prequantized_folder_equals_quantize_on_load(
    v2_folders: dict[str, Path], bits: str, dtype: torch.dtype
) -> None:
    on_load = load_family("chatglm2", v2_folders["fp16"], dtype, quantize=bits)
    prequantized = load_family("chatglm2", v2_folders[bits], dtype)
    ids = [5, 17, 3, 44, 9, 60, 2]
    for model in (on_load, prequantized):
        assert len(quantized_layers(model)) == 8
    a = on_load.forward(ids, on_load.new_cache())
    b = prequantized.forward(ids, prequantized.new_cache())
    assert torch.equal(a, b)
    full = load_family("chatglm2", v2_folders["fp16"], dtype)
    ref = full.forward(ids, full.new_cache())
    assert torch.isfinite(a).all()
    # quantisation noise on a random tiny model: bounded, and int8 closer than int4
    rel = ((a - ref).norm() / ref.norm()).item()
    logger.info("int%s %s relative logit error vs unquantised: %.4f", bits, dtype, rel)
    assert rel < (0.1 if bits == "8" else 0.5)


def test_quantized_decode_matches_prefill(v2_folders: dict[str, Path]) -> None:
    model = load_family("chatglm2", v2_folders["4"], torch.bfloat16)
    ids = [5, 17, 3, 44, 9]
    whole = model.forward(ids, model.new_cache())
    cache = model.new_cache()
    model.forward(ids[:-1], cache)
    step = model.forward(ids[-1:], cache)
    assert torch.allclose(whole, step, atol=0.1, rtol=0)  # bf16 attention noise only


def test_malformed_prequantized_folders(v2_folders: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_chatglm2_model import VARIANT_CONFIG, write_checkpoint

    qsd = dict(iter_tensors(v2_folders["4"]))
    lacking = {
        k: v for k, v in qsd.items() if not k.endswith("layers.1.mlp.dense_4h_to_h.weight_scale")
    }
    cfg = VARIANT_CONFIG | {"quantization_bit": 4}
    with pytest.raises(CheckpointError, match="incomplete"):
        load_family("chatglm2", write_checkpoint(tmp_path / "a", cfg, lacking, "bin"))
    # an int8 folder declared int4: the packed width does not match
    int8 = dict(iter_tensors(v2_folders["8"]))
    with pytest.raises(CheckpointError, match="int4"):
        load_family("chatglm2", write_checkpoint(tmp_path / "b", cfg, int8, "bin"))
    with pytest.raises(ValueError, match="already quantised"):
        load_family("chatglm2", v2_folders["4"], quantize="8")
    with pytest.raises(ValueError, match="unknown quantization mode"):
        load_family("chatglm2", v2_folders["fp16"], quantize="int8")
