"""ChatGLM-6B torch model: THUDM's numbers on the reference checkpoints, and its own invariants
on tiny random checkpoints written here."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from adapters.chatglm.config import ChatGLMConfig, read_config
from adapters.chatglm.model import ChatGLMModel, load_model
from adapters.weights.checkpoint import CheckpointError
from tests.conftest import checkpoint_dir, oracle

TINY = ChatGLMConfig(
    vocab_size=300, hidden_size=32, num_layers=2, num_attention_heads=4, inner_hidden_size=64,
    max_sequence_length=256, bos_token_id=204, eos_token_id=205, mask_token_id=200,
    gmask_token_id=201, pad_token_id=3,
)


def write_checkpoint(folder: Path, config: ChatGLMConfig = TINY, seed: int = 0,
                     extra: dict[str, torch.Tensor] | None = None,
                     drop: tuple[str, ...] = ()) -> Path:
    """A random v1 checkpoint in THUDM's layout: config.json, two fp16 .bin shards + index,
    tied lm_head.weight and the rotary inv_freq buffers stored too."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = ChatGLMModel(config)
    state = {name: (p.detach() * 3).half() for name, p in model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
    for i in range(config.num_layers):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4).half()
    state.update(extra or {})
    for name in drop:
        del state[name]
    first = {k: v for k, v in state.items() if "word_embeddings" in k or k == "lm_head.weight"}
    second = {k: v for k, v in state.items() if k not in first}
    names = {"pytorch_model-00001-of-00002.bin": first, "pytorch_model-00002-of-00002.bin": second}
    for file, shard in names.items():
        torch.save(shard, folder / file)
    index = {"weight_map": {k: f for f, shard in names.items() for k in shard}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    config_json = {**asdict(config), "model_type": "chatglm", "pre_seq_len": None}
    (folder / "config.json").write_text(json.dumps(config_json))
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("chatglm_model"))


@pytest.fixture(scope="module")
def tiny_model(tiny_folder: Path) -> ChatGLMModel:
    return load_model(tiny_folder, read_config(tiny_folder), dtype=torch.float32, device="cpu")


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 199, (n,), generator=g).tolist() + [TINY.gmask_token_id, TINY.bos_token_id]


# ---------------------------------------------------------------- without the reference


def test_loads_in_place_of_meta(tiny_model: ChatGLMModel) -> None:
    for name, param in tiny_model.named_parameters():
        assert param.device.type == "cpu" and param.dtype == torch.float32, name
    assert tiny_model.padded_vocab_size == TINY.vocab_size
    assert tiny_model.context_length == TINY.max_sequence_length
    # the four linears of each layer are plain nn.Linear under THUDM's names
    for suffix in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                   "mlp.dense_4h_to_h"):
        assert isinstance(tiny_model.get_submodule(f"transformer.layers.1.{suffix}"), torch.nn.Linear)


def test_incremental_equals_full_prefill(tiny_model: ChatGLMModel) -> None:
    # 80 ids cross the cache's initial capacity of 64; generated ids are causal after <sop>,
    # so one prefill over prompt + generated ids must give the same last logits.
    ids = prompt(70)
    generated = [17, 42, 99, 120, 7, 7, 150, 33, 60, 61, 62]
    cache = tiny_model.new_cache()
    logits = tiny_model.forward(ids, cache)
    for token in generated:
        logits = tiny_model.forward([token], cache)
    assert cache.length == len(ids) + len(generated)
    full = tiny_model.forward(ids + generated, tiny_model.new_cache())
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    assert logits.dtype == torch.float32 and logits.shape == (TINY.vocab_size,)


def _layer1_keys(model: ChatGLMModel, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache()
    model.forward(ids, cache)
    return cache.storage[1, 0, :, : len(ids)]  # second layer's keys: depend on the first's attention


def test_context_is_bidirectional_and_answer_causal(tiny_model: ChatGLMModel) -> None:
    ids = prompt(10)  # context = 10 ids + [gMASK]; <sop> at index 11
    changed = list(ids)
    changed[8] = 77
    a, b = _layer1_keys(tiny_model, ids + [50, 60]), _layer1_keys(tiny_model, changed + [50, 60])
    # bidirectional context: position 0 already sees position 8
    assert not torch.allclose(a[:, 0], b[:, 0])
    # causal answer: changing the last generated id leaves every earlier position alone
    c = _layer1_keys(tiny_model, ids + [50, 61])
    torch.testing.assert_close(a[:, :-1], c[:, :-1])
    assert not torch.allclose(a[:, -1], c[:, -1])


def test_batch_equals_solo(tiny_model: ChatGLMModel) -> None:
    prompts = [prompt(5, seed=1), prompt(23, seed=2), prompt(11, seed=3)]
    solo = [tiny_model.new_cache() for _ in prompts]
    batch = [tiny_model.new_cache() for _ in prompts]
    last = []
    for p, a, b in zip(prompts, solo, batch, strict=True):
        la = tiny_model.forward(p, a)
        lb = tiny_model.forward(p, b)
        torch.testing.assert_close(la, lb)
        last.append(int(la.argmax()))
    for _ in range(4):
        rows = tiny_model.forward_batch([[t] for t in last], batch)
        singles = torch.stack([tiny_model.forward([t], c) for t, c in zip(last, solo, strict=True)])
        torch.testing.assert_close(rows, singles, atol=1e-4, rtol=1e-4)
        assert rows.argmax(-1).tolist() == singles.argmax(-1).tolist()
        last = rows.argmax(-1).tolist()
    assert [c.length for c in batch] == [c.length for c in solo]


def test_forward_batch_validates(tiny_model: ChatGLMModel) -> None:
    cache = tiny_model.new_cache()
    tiny_model.forward(prompt(3), cache)
    with pytest.raises(ValueError, match="one new id"):
        tiny_model.forward_batch([[1, 2]], [cache])
    with pytest.raises(ValueError, match="same cache"):
        tiny_model.forward_batch([[1], [2]], [cache, cache])
    with pytest.raises(ValueError, match="prefill"):
        tiny_model.forward_batch([[1]], [tiny_model.new_cache()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite_and_close(tiny_folder: Path, tiny_model: ChatGLMModel,
                                            dtype: torch.dtype) -> None:
    model = load_model(tiny_folder, read_config(tiny_folder), dtype=dtype, device="cpu")
    # (bf16 on the native kernels: the table is stored packed with the tied output layer)
    assert model.transformer.word_embeddings(torch.tensor([0, 5])).dtype == dtype
    ids = prompt(12)
    logits = model.forward(ids, model.new_cache())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    reference = tiny_model.forward(ids, tiny_model.new_cache())
    assert torch.nn.functional.cosine_similarity(logits, reference, dim=0) > 0.99


def test_checkpoint_errors(tmp_path: Path) -> None:
    missing = write_checkpoint(tmp_path / "missing", drop=("transformer.final_layernorm.bias",))
    with pytest.raises(CheckpointError, match="final_layernorm.bias"):
        load_model(missing, TINY)
    unknown = write_checkpoint(tmp_path / "unknown", extra={"transformer.prefix_encoder.embedding.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="prefix_encoder"):
        load_model(unknown, TINY)
    with pytest.raises(CheckpointError, match="shape"):
        load_model(write_checkpoint(tmp_path / "ok"), replace(TINY, inner_hidden_size=128))
    with pytest.raises(CheckpointError, match="int4"):
        load_model(tmp_path / "ok", replace(TINY, quantization_bit=4))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "c")
    data = json.loads((folder / "config.json").read_text())
    for key, value in (("hidden_size", "64"), ("position_encoding_2d", 1), ("num_layers", 0),
                       ("quantization_bit", 3), ("hidden_size", 30)):
        (folder / "config.json").write_text(json.dumps({**data, key: value}))
        with pytest.raises(CheckpointError, match=key):
            read_config(folder)


# ---------------------------------------------------------------- against THUDM's numbers


@pytest.fixture(scope="module")
def reference_model() -> ChatGLMModel:
    folder = checkpoint_dir("chatglm-6b-tiny")
    return load_model(folder, read_config(folder), dtype=torch.float32, device="cpu")


def test_reference_logits_and_greedy(reference_model: ChatGLMModel) -> None:
    for case in oracle("chatglm-6b-tiny")["cases"]:
        cache = reference_model.new_cache()
        logits = reference_model.forward(case["inputs"]["input_ids"][0], cache)
        top = torch.topk(logits, 10)
        assert top.indices.tolist() == case["last_logits_topk"]["ids"], case["case"]
        torch.testing.assert_close(top.values, torch.tensor(case["last_logits_topk"]["values"]),
                                   atol=1e-4, rtol=0)
        stats = case["last_logits_stats"]
        assert logits.shape == (stats["n"],)
        assert abs(torch.logsumexp(logits.double(), 0).item() - stats["logsumexp"]) < 1e-4
        generated = []
        for step in case["greedy_step_top5"]:
            top5 = torch.topk(logits, 5)
            assert top5.indices.tolist() == step["ids"], case["case"]
            torch.testing.assert_close(top5.values, torch.tensor(step["values"]), atol=1e-4, rtol=0)
            generated.append(int(logits.argmax()))
            logits = reference_model.forward([generated[-1]], cache)
        assert generated == case["greedy_new_ids"], case["case"]


def test_reference_smallvocab_full_logits() -> None:
    folder = checkpoint_dir("chatglm-6b-tiny-smallvocab")
    model = load_model(folder, read_config(folder), dtype=torch.float32, device="cpu")
    for raw in oracle("chatglm-6b-tiny-smallvocab")["raw"]:
        cache = model.new_cache()
        logits = model.forward(raw["input_ids"], cache)
        torch.testing.assert_close(logits, torch.tensor(raw["last_logits"]), atol=1e-4, rtol=0)
        generated = [int(logits.argmax())]
        for _ in range(len(raw["greedy_new_ids"]) - 1):
            generated.append(int(model.forward([generated[-1]], cache).argmax()))
        assert generated == raw["greedy_new_ids"]


def test_reference_int4_loads_weight_only_int4_layers() -> None:
    from adapters.weights.layers import Int4Linear

    folder = checkpoint_dir("chatglm-6b-int4-tiny")
    config = read_config(folder)
    assert config.quantization_bit == 4
    model = load_model(folder, config, dtype=torch.bfloat16, device="cpu")
    assert isinstance(model.transformer.layers[0].attention.query_key_value, Int4Linear)
    assert torch.isfinite(model.forward([5, 6, 130001, 130004], model.new_cache())).all()


def test_every_position_rows_equal_one_id_at_a_time(tiny_model: ChatGLMModel) -> None:
    """After the prompt (its context is seen bidirectionally), several ids fed at once with
    ``every_position`` give row by row the logits one-at-a-time decoding would."""
    together, stepwise = tiny_model.new_cache(), tiny_model.new_cache()
    tiny_model.forward(prompt(6), together)
    tiny_model.forward(prompt(6), stepwise)
    ids = [17, 33, 60, 5]
    rows = tiny_model.forward(ids, together, every_position=True)
    assert rows.shape == (len(ids), TINY.vocab_size)
    for i, token in enumerate(ids):
        expected = tiny_model.forward([token], stepwise)
        assert torch.allclose(rows[i], expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
