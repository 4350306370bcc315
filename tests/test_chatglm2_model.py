"""ChatGLM2/3 torch model: THUDM's reference numbers, an independent float64 re-derivation on
self-written random checkpoints, loading, KV cache and batched decode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from adapters.chatglm2 import V2_SPEC
from adapters.chatglm2.config import ChatGLM2Config, detect_version, read_config
from adapters.chatglm2.model import ChatGLM2Model, load_model
from adapters.weights.checkpoint import CheckpointError
from tests.conftest import checkpoint_dir, oracle

BASE_CONFIG: dict = {
    "_name_or_path": "THUDM/chatglm2-6b",
    "padded_vocab_size": 96, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
    "kv_channels": 8, "multi_query_attention": True, "multi_query_group_num": 2,
    "ffn_hidden_size": 40, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True,
    "post_layer_norm": True, "layernorm_epsilon": 1e-5, "seq_length": 160, "eos_token_id": 2,
    "pad_token_id": 0, "torch_dtype": "float16", "quantization_bit": 0,
    "apply_residual_connection_post_layernorm": False,
}
# Every switch flipped: no MQA (per-head q/k/v layout), LayerNorm, biases everywhere,
# post-LN residuals, no final norm, long-context rope_ratio.
VARIANT_CONFIG: dict = {
    **BASE_CONFIG, "multi_query_attention": False, "rmsnorm": False, "add_bias_linear": True,
    "apply_residual_connection_post_layernorm": True, "post_layer_norm": False,
    "rope_ratio": 2.5,
}


# --------------------------------------------------------------------------- checkpoint writing


def random_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """THUDM's tensor names and shapes for ``cfg``, random fp16 values (as in a real folder)."""
    gen = torch.Generator().manual_seed(seed)
    h, v, f = cfg["hidden_size"], cfg["padded_vocab_size"], cfg["ffn_hidden_size"]
    heads, hd = cfg["num_attention_heads"], cfg["kv_channels"]
    groups = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    lin_bias = cfg["add_bias_linear"]

    def rnd(*shape: int, scale: float = 0.2, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale + shift).half()

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight": rnd(h, scale=0.1, shift=1.0)}
        if not cfg["rmsnorm"]:
            out[f"{prefix}.bias"] = rnd(h, scale=0.1)
        return out

    sd = {"transformer.embedding.word_embeddings.weight": rnd(v, h, scale=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd |= norm(p + "input_layernorm") | norm(p + "post_attention_layernorm")
        sd[p + "self_attention.query_key_value.weight"] = rnd(heads * hd + 2 * groups * hd, h)
        if cfg["add_qkv_bias"] or lin_bias:
            sd[p + "self_attention.query_key_value.bias"] = rnd(heads * hd + 2 * groups * hd)
        sd[p + "self_attention.dense.weight"] = rnd(h, heads * hd)
        sd[p + "mlp.dense_h_to_4h.weight"] = rnd(2 * f, h)
        sd[p + "mlp.dense_4h_to_h.weight"] = rnd(h, f)
        if lin_bias:
            sd[p + "self_attention.dense.bias"] = rnd(h)
            sd[p + "mlp.dense_h_to_4h.bias"] = rnd(2 * f)
            sd[p + "mlp.dense_4h_to_h.bias"] = rnd(h)
    if cfg["post_layer_norm"]:
        sd |= norm("transformer.encoder.final_layernorm")
    sd["transformer.output_layer.weight"] = rnd(v, h)
    # THUDM checkpoints carry an fp16 copy of inv_freq; the loader must ignore it.
    sd["transformer.rotary_pos_emb.inv_freq"] = torch.full((hd // 4,), 7.0).half()
    return sd


def write_checkpoint(folder: Path, cfg: dict, sd: dict[str, torch.Tensor], fmt: str) -> Path:
    """Write ``sd`` as 2 shards + index: ``fmt`` "bin" (pytorch_model-*.bin) or "safetensors"."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    names = sorted(sd)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        if fmt == "bin":
            fname = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({n: sd[n] for n in shard}, folder / fname)
        else:
            fname = f"model-{i:05d}-of-00002.safetensors"
            save_file({n: sd[n].contiguous() for n in shard}, str(folder / fname))
        weight_map |= {n: fname for n in shard}
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def load(folder: Path, dtype: torch.dtype = torch.float32) -> ChatGLM2Model:
    return load_model(folder, read_config(folder), dtype=dtype, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("base"), BASE_CONFIG,
                            random_state_dict(BASE_CONFIG), "bin")


@pytest.fixture(scope="module")
def base_model(base_folder: Path) -> ChatGLM2Model:
    return load(base_folder)


# --------------------------------------------------------------------------- independent maths


def naive_logits(cfg: dict, sd: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """All-position logits in float64, written from THUDM's modeling_chatglm.py formulas with
    explicit loops and no KV cache: an independent check of the model."""
    w = {k: t.double() for k, t in sd.items()}
    t_len, hd, heads = len(ids), cfg["kv_channels"], cfg["num_attention_heads"]
    groups = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    eps, h_size = cfg["layernorm_epsilon"], cfg["hidden_size"]
    base = 10000 * cfg.get("rope_ratio", 1.0)

    def norm(x: torch.Tensor, p: str) -> torch.Tensor:
        if cfg["rmsnorm"]:
            return w[p + ".weight"] * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return F.layer_norm(x, (h_size,), w[p + ".weight"], w[p + ".bias"], eps)

    def lin(x: torch.Tensor, p: str) -> torch.Tensor:
        y = x @ w[p + ".weight"].T
        return y + w[p + ".bias"] if p + ".bias" in w else y

    def rotate(x: torch.Tensor) -> torch.Tensor:  # [T, n, hd]; pairs in the first half only
        out = x.clone()
        rot_dims = hd // 2
        for i in range(rot_dims // 2):
            angle = torch.arange(t_len, dtype=torch.float64) * base ** (-(2 * i) / rot_dims)
            c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
            a, b = x[:, :, 2 * i], x[:, :, 2 * i + 1]
            out[:, :, 2 * i], out[:, :, 2 * i + 1] = a * c - b * s, b * c + a * s
        return out

    x = w["transformer.embedding.word_embeddings.weight"][ids]
    causal = torch.ones(t_len, t_len).tril().bool()
    for layer in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{layer}."
        n1 = norm(x, p + "input_layernorm")
        qkv = lin(n1, p + "self_attention.query_key_value")
        if cfg["multi_query_attention"]:
            q = qkv[:, : heads * hd].reshape(t_len, heads, hd)
            k = qkv[:, heads * hd: (heads + groups) * hd].reshape(t_len, groups, hd)
            v = qkv[:, (heads + groups) * hd:].reshape(t_len, groups, hd)
        else:
            per_head = qkv.reshape(t_len, heads, 3 * hd)
            q, k, v = per_head[..., :hd], per_head[..., hd: 2 * hd], per_head[..., 2 * hd:]
        q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        ctx = torch.einsum("hts,shd->thd", probs, v).reshape(t_len, heads * hd)
        h = (n1 if cfg["apply_residual_connection_post_layernorm"] else x) + lin(
            ctx, p + "self_attention.dense")
        n2 = norm(h, p + "post_attention_layernorm")
        gate, up = lin(n2, p + "mlp.dense_h_to_4h").chunk(2, dim=-1)
        mlp = lin(F.silu(gate) * up, p + "mlp.dense_4h_to_h")
        x = (n2 if cfg["apply_residual_connection_post_layernorm"] else h) + mlp
    if cfg["post_layer_norm"]:
        x = norm(x, "transformer.encoder.final_layernorm")
    return lin(x, "transformer.output_layer")


@pytest.mark.parametrize("cfg", [BASE_CONFIG, VARIANT_CONFIG], ids=["base", "variant"])
def test_matches_independent_float64_maths(tmp_path: Path, cfg: dict) -> None:
    sd = random_state_dict(cfg, seed=3)
    model = load(write_checkpoint(tmp_path, cfg, sd, "safetensors"))
    ids = torch.randint(0, cfg["padded_vocab_size"], (23,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    expected = naive_logits(cfg, sd, ids).float()
    assert expected.std() > 0.5  # the random model is far from trivial

    one_shot = model.forward(ids, model.new_cache())
    torch.testing.assert_close(one_shot, expected[-1], atol=1e-4, rtol=1e-4)

    step_by_step = model.new_cache()
    for t, token in enumerate(ids):
        torch.testing.assert_close(model.forward([token], step_by_step), expected[t],
                                   atol=1e-4, rtol=1e-4)

    chunked = model.new_cache()  # prefill continued on a non-empty cache needs an offset mask
    model.forward(ids[:5], chunked)
    torch.testing.assert_close(model.forward(ids[5:12], chunked), expected[11],
                               atol=1e-4, rtol=1e-4)
    assert chunked.length == 12


# --------------------------------------------------------------------------- loading


def test_bin_and_safetensors_load_identically(tmp_path: Path) -> None:
    sd = random_state_dict(BASE_CONFIG, seed=5)
    a = load(write_checkpoint(tmp_path / "bin", BASE_CONFIG, sd, "bin"))
    b = load(write_checkpoint(tmp_path / "st", BASE_CONFIG, sd, "safetensors"))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() == {k for k in sd if not k.endswith("inv_freq")}
    for name, value in pa.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert not value.requires_grad
        assert torch.equal(value, pb[name]), name
        assert torch.equal(value, sd[name].float()), name
    ids = [5, 17, 42, 8, 1]
    assert torch.equal(a.forward(ids, a.new_cache()), b.forward(ids, b.new_cache()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(base_folder: Path, base_model: ChatGLM2Model,
                             dtype: torch.dtype) -> None:
    model = load(base_folder, dtype)
    assert model.dtype == dtype and model.rope.dtype == dtype
    cache = model.new_cache()
    ids = [3, 9, 27, 81, 50, 7]
    logits = model.forward(ids, cache)
    logits = model.forward([int(logits.argmax())], cache)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    ref_cache = base_model.new_cache()
    base_model.forward(ids, ref_cache)
    reference = base_model.forward([int(model.forward(ids, model.new_cache()).argmax())],
                                   ref_cache)
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()


def test_loading_errors_name_the_tensor(tmp_path: Path) -> None:
    sd = random_state_dict(BASE_CONFIG)
    missing = {k: t for k, t in sd.items() if k != "transformer.output_layer.weight"}
    with pytest.raises(CheckpointError, match="output_layer.weight"):
        load(write_checkpoint(tmp_path / "missing", BASE_CONFIG, missing, "bin"))
    extra = sd | {"transformer.prefix_encoder.embedding.weight": torch.zeros(2, 2).half()}
    with pytest.raises(CheckpointError, match="prefix_encoder"):
        load(write_checkpoint(tmp_path / "extra", BASE_CONFIG, extra, "safetensors"))
    wrong = sd | {"transformer.encoder.layers.1.mlp.dense_4h_to_h.weight": torch.zeros(3, 3).half()}
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.dense_4h_to_h.*\(3, 3\)"):
        load(write_checkpoint(tmp_path / "wrong", BASE_CONFIG, wrong, "bin"))


def test_quantization_bit_with_full_precision_weights_is_a_clear_error(tmp_path: Path) -> None:
    cfg = BASE_CONFIG | {"quantization_bit": 4}
    folder = write_checkpoint(tmp_path, cfg, random_state_dict(BASE_CONFIG), "bin")
    with pytest.raises(CheckpointError, match="int4"):
        load(folder)


def test_the_four_linears_can_be_swapped_by_name(base_folder: Path) -> None:
    model = load(base_folder)
    calls = []

    class Spy(nn.Module):
        def __init__(self, inner: nn.Linear):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[-1])
            return self.inner(x)

    before = model.forward([1, 2, 3], model.new_cache())
    names = ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
             "mlp.dense_4h_to_h"]
    for layer in range(BASE_CONFIG["num_layers"]):
        for name in names:
            path = f"transformer.encoder.layers.{layer}.{name}"
            parent, _, attr = path.rpartition(".")
            linear = model.get_submodule(path)
            assert type(linear) is nn.Linear
            setattr(model.get_submodule(parent), attr, Spy(linear))
    after = model.forward([1, 2, 3], model.new_cache())
    assert len(calls) == 4 * BASE_CONFIG["num_layers"]
    assert torch.equal(before, after)


def test_family_row_loads_the_model(base_folder: Path) -> None:
    cfg = V2_SPEC.read_config(base_folder)
    model = V2_SPEC.load_model(base_folder, cfg, dtype=torch.float32, device="cpu")
    assert model.padded_vocab_size == 96 and model.context_length == 160
    with pytest.raises(ValueError, match="quantization"):
        V2_SPEC.load_model(base_folder, cfg, dtype=torch.float32, device="cpu", quantize="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda(base_folder: Path, base_model: ChatGLM2Model) -> None:
    model = load_model(base_folder, read_config(base_folder), dtype=torch.float32,
                       device=torch.device("cuda"))
    ids = [4, 8, 15, 16, 23, 42]
    torch.testing.assert_close(model.forward(ids, model.new_cache()).cpu(),
                               base_model.forward(ids, base_model.new_cache()),
                               atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- cache and batching


def test_cache_grows_geometrically_and_stops_at_the_context(base_model: ChatGLM2Model) -> None:
    cache = base_model.new_cache()
    capacities = set()
    base_model.forward(list(range(10)), cache)
    for t in range(150):
        base_model.forward([t % 90], cache)
        capacities.add(cache.capacity)
    assert cache.length == 160 == base_model.context_length
    assert capacities == {64, 128, 160}  # doubling, capped at seq_length
    with pytest.raises(ValueError, match="context length"):
        base_model.forward([1], cache)
    assert cache.length == 160


def test_forward_batch_equals_solo_forward(base_model: ChatGLM2Model) -> None:
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (3, 70, 21)]
    solo = [base_model.new_cache() for _ in prompts]
    batched = [base_model.new_cache() for _ in prompts]
    next_ids = []
    for prompt, c_solo, c_batch in zip(prompts, solo, batched, strict=True):
        first = base_model.forward(prompt, c_solo)
        torch.testing.assert_close(base_model.forward(prompt, c_batch), first)
        next_ids.append(int(first.argmax()))
    for _ in range(5):
        rows = base_model.forward_batch([[i] for i in next_ids], batched)
        assert rows.shape == (3, 96) and rows.dtype == torch.float32
        for b, (token, cache) in enumerate(zip(next_ids, solo, strict=True)):
            torch.testing.assert_close(rows[b], base_model.forward([token], cache),
                                       atol=1e-5, rtol=1e-5)
        next_ids = [int(r.argmax()) for r in rows]
    assert [c.length for c in batched] == [c.length for c in solo] == [8, 75, 26]


def test_forward_batch_rejects_bad_input(base_model: ChatGLM2Model) -> None:
    cache = base_model.new_cache()
    base_model.forward([1, 2], cache)
    with pytest.raises(ValueError, match="one new id"):
        base_model.forward_batch([[1, 2]], [cache])
    with pytest.raises(ValueError, match="same cache"):
        base_model.forward_batch([[1], [2]], [cache, cache])
    with pytest.raises(TypeError, match="new_cache"):
        base_model.forward([1], object())  # type: ignore[arg-type]
    assert cache.length == 2


# --------------------------------------------------------------------------- config


def test_read_config_defaults_and_errors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BASE_CONFIG))
    cfg = read_config(tmp_path)
    assert isinstance(cfg, ChatGLM2Config)
    assert cfg.rope_ratio == 1.0 and cfg.quantization_bit == 0 and cfg.kv_groups == 2
    no_quant = {k: v for k, v in BASE_CONFIG.items() if k != "quantization_bit"}
    (tmp_path / "config.json").write_text(json.dumps(no_quant | {"rope_ratio": 50}))
    assert read_config(tmp_path).rope_ratio == 50.0
    assert read_config(tmp_path).quantization_bit == 0
    for broken, message in [
        ({k: v for k, v in BASE_CONFIG.items() if k != "kv_channels"}, "'kv_channels' is missing"),
        (BASE_CONFIG | {"num_layers": "2"}, "'num_layers' must be int"),
        (BASE_CONFIG | {"rmsnorm": 1}, "'rmsnorm' must be bool"),
        (BASE_CONFIG | {"multi_query_group_num": 3}, "'multi_query_group_num'"),
        (BASE_CONFIG | {"torch_dtype": "int8"}, "'torch_dtype'"),
        (BASE_CONFIG | {"quantization_bit": 3}, "'quantization_bit'"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=message):
            read_config(tmp_path)


def test_detect_version(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BASE_CONFIG))
    assert detect_version(tmp_path) == "chatglm2"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "x/y"}))
    assert detect_version(tmp_path) == "chatglm2"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}<|user|>{% endfor %}"}))
    assert detect_version(tmp_path) == "chatglm3"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "THUDM/chatglm3-6b-32k"}))
    assert detect_version(tmp_path) == "chatglm3"
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(BASE_CONFIG | {"_name_or_path": "THUDM/chatglm3-6b-base"}))
    assert detect_version(tmp_path) == "chatglm3"


@pytest.mark.parametrize("name,version", [
    ("chatglm2-6b-tiny", "chatglm2"), ("chatglm2-6b-tiny-smallvocab", "chatglm2"),
    ("chatglm2-6b-int8-tiny", "chatglm2"), ("chatglm3-6b-tiny-safetensors", "chatglm3"),
])
def test_reference_versions(name: str, version: str) -> None:
    assert detect_version(checkpoint_dir(name)) == version


# --------------------------------------------------------------------------- reference numbers


@pytest.fixture(scope="module", params=["chatglm2-6b-tiny", "chatglm3-6b-tiny-safetensors",
                                        "chatglm2-6b-tiny-smallvocab"])
def reference(request: pytest.FixtureRequest) -> tuple[ChatGLM2Model, dict]:
    folder = checkpoint_dir(request.param)
    return load(folder), oracle(request.param)


def test_reference_logits_and_greedy(reference: tuple[ChatGLM2Model, dict]) -> None:
    model, data = reference
    cases = data.get("cases") or data["raw"]
    for case in cases:
        label = case.get("case", "raw")
        ids = case["inputs"]["input_ids"][0] if "inputs" in case else case["input_ids"]
        cache = model.new_cache()
        logits = model.forward(ids, cache)
        if "last_logits" in case:
            torch.testing.assert_close(logits, torch.tensor(case["last_logits"]), atol=1e-4,
                                       rtol=0)
        else:
            values, top = logits.topk(10)
            assert top.tolist() == case["last_logits_topk"]["ids"], label
            torch.testing.assert_close(values, torch.tensor(case["last_logits_topk"]["values"]),
                                       atol=1e-4, rtol=0)
        stats = case["last_logits_stats"]
        assert int(logits.argmax()) == stats["argmax"], label
        assert abs(float(logits.max()) - stats["max"]) < 1e-4, label
        assert abs(float(logits.logsumexp(0)) - stats["logsumexp"]) < 1e-4, label
        generated = []
        for step in case["greedy_step_top5"]:
            values, top = logits.topk(5)
            assert top.tolist() == step["ids"], label
            torch.testing.assert_close(values, torch.tensor(step["values"]), atol=1e-3, rtol=0)
            generated.append(int(logits.argmax()))
            logits = model.forward([generated[-1]], cache)
        assert generated == case["greedy_new_ids"], label


def test_reference_prequantized_folder_loads_weight_only_int8_layers() -> None:
    from adapters.weights.layers import Int8Linear

    model = load(checkpoint_dir("chatglm2-6b-int8-tiny"))
    layer = model.transformer.encoder.layers[0]
    assert isinstance(layer.self_attention.query_key_value, Int8Linear)
    assert isinstance(layer.mlp.dense_4h_to_h, Int8Linear)
    assert torch.isfinite(model.forward([64790, 64792, 100], model.new_cache())).all()
