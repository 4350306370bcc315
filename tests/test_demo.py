"""The embedded demo checkpoint: layout, config, tokenizer, weights, idempotent atomic creation."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from adapters import demo
from adapters.demo import (
    DEMO_DESCRIPTION,
    DEMO_FOLDER_NAME,
    DEMO_MODEL_ID,
    DEMO_RECIPE,
    MARKER_FILE,
    DemoRecipe,
    ensure_demo_checkpoint,
)
from adapters.weights.checkpoint import iter_tensors
from tests.conftest import checkpoint_dir, oracle

EXPECTED_FILES = {
    "config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "model.safetensors",
    "README.md",
    MARKER_FILE,
}

ROUND_TRIP = [
    "Hello, world! The gateway answers chat requests.",
    "你好，世界！这是一个演示模型。",
    "中文English混合123 and 4567",
    "emoji 😀🚀🇨🇳 and 👨\u200d👩\u200d👧 family",
    "tab\tseparated\tcolumns",
    "line1\nline2\n\n\nline5\n",
    "a  b   c    d     e",
    "   leading and trailing spaces   ",
    " one leading space",
    "\t\n \n\t",
    "def f(x):\n    return x  *  2\n\t# comment",
    "ＡＢＣ全角 and \u00a0nbsp and \u3000ideographic space",
    "[gMASK] sop <unk> </s> are literal text here",
    "",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def sp(folder: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def test_folder_has_the_files_of_a_chatglm2_checkpoint(folder: Path) -> None:
    assert folder.name == DEMO_FOLDER_NAME == "chatglm2-demo-v1"
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES
    # No leftovers of the temporary build next to it.
    assert [p.name for p in folder.parent.iterdir()] == [DEMO_FOLDER_NAME]
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "meaningless" in readme and "chatglm-gateway serve --model NAME=PATH" in readme


def test_public_names() -> None:
    assert DEMO_MODEL_ID == "chatglm2-demo"
    assert "meaningless" in DEMO_DESCRIPTION
    assert "chatglm-gateway serve --model NAME=PATH" in DEMO_DESCRIPTION


def test_config_is_a_consistent_chatglm2_config(
    config: dict, sp: spm.SentencePieceProcessor
) -> None:
    assert config["_name_or_path"] == "chatglm-gateway/chatglm2-demo"
    assert config["model_type"] == "chatglm"
    assert config["eos_token_id"] == 2 and config["pad_token_id"] == 0
    assert config["seq_length"] == 2048
    assert config["num_attention_heads"] * config["kv_channels"] == config["hidden_size"]
    assert config["num_attention_heads"] % config["multi_query_group_num"] == 0
    assert config["multi_query_attention"] is True and config["rmsnorm"] is True
    assert config["quantization_bit"] == 0 and config["pre_seq_len"] is None
    # THUDM ChatGLM2: five special ids after the SentencePiece pieces, logits padded past them.
    needed = sp.vocab_size() + 5
    padded = config["padded_vocab_size"]
    assert padded % 64 == 0 and needed <= padded < needed + 64
    assert config["vocab_size"] == padded
    assert 1000 <= sp.vocab_size() <= 2000


def test_tokenizer_config_is_thudm_style(folder: Path) -> None:
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["name_or_path"] == "chatglm-gateway/chatglm2-demo"
    assert cfg["tokenizer_class"] == "ChatGLMTokenizer"
    assert cfg["remove_space"] is False


def test_tokenizer_ids_are_laid_out_like_thudm(sp: spm.SentencePieceProcessor) -> None:
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    # Byte fallback pieces follow the three specials, as in THUDM's model: "\n" is <0x0A> = 13.
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    assert sp.piece_to_id("<0x0A>") == 13 and sp.piece_to_id("<0x09>") == 12
    assert 13 in sp.encode("line1\nline2")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_exactly(sp: spm.SentencePieceProcessor, text: str) -> None:
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert all(0 <= i < sp.vocab_size() for i in ids)


def test_tokenizer_settings(sp: spm.SentencePieceProcessor) -> None:
    # split_digits: every digit is its own piece.
    pieces = [p for p in sp.encode_as_pieces("x 2048") if p not in ("▁", "x")]
    assert "".join(pieces).lstrip("▁") == "2048" and len([p for p in pieces if p.strip("▁")]) == 4
    # Unseen characters fall back to bytes instead of <unk>.
    assert 0 not in sp.encode("😀 ☃ ꙮ")
    # A dummy prefix is added and runs of spaces are kept as whitespace-only pieces.
    assert sp.encode_as_pieces("hello")[0].startswith("▁")
    assert any(set(p) == {"▁"} and len(p) > 1 for p in sp.encode_as_pieces("a    b"))
    # User text never becomes a special token: they are not SentencePiece pieces at all.
    for special in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"):
        assert sp.piece_to_id(special) == 0


def test_weights_have_thudm_names_and_shapes(folder: Path, config: dict) -> None:
    tensors = dict(iter_tensors(folder))
    h, ffn, v = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    qkv = h + 2 * config["multi_query_group_num"] * config["kv_channels"]
    expected = {
        "transformer.embedding.word_embeddings.weight": (v, h),
        "transformer.encoder.final_layernorm.weight": (h,),
        "transformer.output_layer.weight": (v, h),
        "transformer.rotary_pos_emb.inv_freq": (config["kv_channels"] // 4,),
    }
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        expected |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attention.query_key_value.weight": (qkv, h),
            p + "self_attention.query_key_value.bias": (qkv,),
            p + "self_attention.dense.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.dense_h_to_4h.weight": (2 * ffn, h),
            p + "mlp.dense_4h_to_h.weight": (h, ffn),
        }
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in tensors.values())
    emb = tensors["transformer.embedding.word_embeddings.weight"].float()
    assert abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 0.002
    assert torch.equal(
        tensors["transformer.encoder.final_layernorm.weight"], torch.ones(h, dtype=torch.float16)
    )
    inv_freq = tensors["transformer.rotary_pos_emb.inv_freq"].float()
    dim = config["kv_channels"] // 2
    want = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    torch.testing.assert_close(inv_freq, want, rtol=1e-3, atol=0.0)


def test_second_call_reuses_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_demo_checkpoint(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    def no_training(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(demo, "train_demo_tokenizer", no_training)
    second = ensure_demo_checkpoint(tmp_path)
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == stamps


def test_a_damaged_folder_is_rebuilt(tmp_path: Path) -> None:
    folder = ensure_demo_checkpoint(tmp_path)
    good = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(good[: len(good) // 2])
    assert ensure_demo_checkpoint(tmp_path) == folder
    assert (folder / "model.safetensors").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_FOLDER_NAME]


def test_a_folder_from_another_recipe_is_rebuilt(tmp_path: Path) -> None:
    folder = ensure_demo_checkpoint(tmp_path, DemoRecipe(seed=1))
    other = (folder / "model.safetensors").read_bytes()
    ensure_demo_checkpoint(tmp_path)
    assert (folder / "model.safetensors").read_bytes() != other
    marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    assert marker["recipe"]["seed"] == DEMO_RECIPE.seed


def test_creation_is_reproducible(tmp_path: Path, folder: Path) -> None:
    again = ensure_demo_checkpoint(tmp_path / "elsewhere")
    for name in EXPECTED_FILES:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_concurrent_callers_get_one_complete_folder(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(ensure_demo_checkpoint(tmp_path))
        except BaseException as exc:  # collected and re-checked below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [tmp_path / DEMO_FOLDER_NAME] * 4
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_FOLDER_NAME]
    assert {p.name for p in results[0].iterdir()} == EXPECTED_FILES


def test_losing_the_race_keeps_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters.demo")
    real_write = demo._write_checkpoint

    def write_while_another_caller_finishes(
        folder: Path, recipe: DemoRecipe, corpus: str, stamp: dict
    ) -> None:
        real_write(folder, recipe, corpus, stamp)
        # Another caller installs its (identical) folder before our rename.
        monkeypatch.setattr(demo, "_write_checkpoint", real_write)
        ensure_demo_checkpoint(tmp_path)

    monkeypatch.setattr(demo, "_write_checkpoint", write_while_another_caller_finishes)
    winner_marker = tmp_path / DEMO_FOLDER_NAME / MARKER_FILE
    assert ensure_demo_checkpoint(tmp_path) == tmp_path / DEMO_FOLDER_NAME
    assert winner_marker.exists()
    assert any("another process created" in r.getMessage() for r in caplog.records)
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_FOLDER_NAME]


# --------------------------------------------------------------------------- against THUDM's files


def test_config_has_thudm_chatglm2_key_set(config: dict) -> None:
    reference = json.loads((checkpoint_dir("chatglm2-6b-tiny") / "config.json").read_text())
    assert set(config) == set(reference)


def test_tokenizer_normalizes_like_thudm(sp: spm.SentencePieceProcessor) -> None:
    """Whatever the pieces, decode(encode(s)) must give what THUDM's tokenizer gives (no NFKC,
    no whitespace folding), and the byte-fallback ids must be the same."""
    tok = oracle("chatglm2-6b-tiny")["tokenizer"]
    for case in tok["strings"]:
        assert sp.decode(sp.encode(case["text"])) == case["decode"], case["text"]
    for id_, entry in tok["single_ids"].items():
        if entry["token"].startswith("<0x"):
            assert sp.id_to_piece(int(id_)) == entry["token"]
    assert tok["attrs"]["pad_token_id"] == 0 == sp.unk_id()


# --------------------------------------------------------------------------- through the ChatGLM2 loader


def test_the_chatglm2_loader_serves_the_demo_folder(folder: Path) -> None:
    # The loader lives in adapters/chatglm2 (owned separately); skip only while it is not there.
    config_mod = pytest.importorskip("adapters.chatglm2.config")
    tokenizer_mod = pytest.importorskip("adapters.chatglm2.tokenizer")
    model_mod = pytest.importorskip("adapters.chatglm2.model")

    cfg = config_mod.read_config(folder)
    version = config_mod.detect_version(folder)
    assert version == "chatglm2"
    tok = tokenizer_mod.load_tokenizer(folder, version)
    sp_size = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()
    assert tok.special("[gMASK]") == sp_size + 1 and tok.special("sop") == sp_size + 3
    assert tok.vocab_size == sp_size + 5 <= cfg.padded_vocab_size
    text = "[Round 1]\n\n问：你好 👋\tworld\n\n答："
    assert tok.decode(tok.encode(text)) == text

    model = model_mod.load_model(folder, cfg, dtype=torch.float32, device="cpu")
    cache = model.new_cache()
    logits = model.forward([tok.special("[gMASK]"), tok.special("sop"), *tok.encode(text)], cache)
    assert logits.shape == (cfg.padded_vocab_size,)
    assert torch.isfinite(logits).all()
    nxt = int(logits.argmax())
    logits = model.forward([nxt], cache)
    assert torch.isfinite(logits).all() and cache.length == len(tok.encode(text)) + 3
