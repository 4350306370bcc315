"""ChatGLM-6B tokenizer: THUDM's ids and decoding, and user text that stays text."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest

from adapters.chatglm.tokenizer import ChatGLMTokenizer, load_tokenizer, preprocess
from adapters.weights.checkpoint import CheckpointError
from tests.conftest import checkpoint_dir, oracle, tokenizer_file

CONTROL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
MARKER_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
TYPED_LITERALS = ["<sop>", "<eop>", "[MASK]", "[gMASK]", "<pad>", "<unk>", "<n>", "<|tab|>",
                  "<|blank_7|>", "</s>", "<s>"]
_CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "你好，世界！我们用中文写几句话来训练分词器。北京是中国的首都。",
    "def f(x):\n    return x * 2",
    "Numbers 0123456789 and punctuation .,;:!?()[]{}<>|_-+=*/#\"'",
    "The quick brown fox jumps over the lazy dog. 混合 English 和 中文 text.",
]


def write_tiny_tokenizer(folder: Path, num_image_tokens: int | None = 0) -> Path:
    """Train a small unigram model laid out like ice_text.model (markers user-defined, THUDM's
    control pieces, byte fallback, <pad> at 3) into ``folder``."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    rng = random.Random(0)
    lines = [rng.choice(_CORPUS) for _ in range(400)]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "ice_text"), model_type="unigram",
        vocab_size=600, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=MARKER_PIECES,
        control_symbols=CONTROL_PIECES, minloglevel=2,
    )
    (folder / "ice_text.vocab").unlink()
    corpus.unlink()
    if num_image_tokens is not None:
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"num_image_tokens": num_image_tokens}), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("chatglm_tok"))


@pytest.fixture(scope="session")
def tiny(tiny_tokenizer_dir: Path) -> ChatGLMTokenizer:
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def real() -> ChatGLMTokenizer:
    return load_tokenizer(checkpoint_dir("chatglm-6b-tiny"))


# ---------------------------------------------------------------- without the reference


def test_preprocess_like_thudm() -> None:
    assert preprocess("a\nb\tc  d") == "a<n>b<|tab|>c<|blank_2|>d"
    assert preprocess(" " * 90 + "x") == "<|blank_80|><|blank_10|>x"
    assert preprocess(" " * 81) == "<|blank_80|> "
    assert preprocess("one space") == "one space"


@pytest.mark.parametrize("text", [
    "Hello world", "line1\nline2\n\nline4", "tab\tsep", "a  b   c    d", "x" + " " * 85 + "y",
    "你好，世界", "def f(x):\n    return x  *  2\n\t# c",
])
def test_round_trip_tiny(tiny: ChatGLMTokenizer, text: str) -> None:
    ids = tiny.encode(text)
    assert not any(tiny.is_control(i) for i in ids)
    # The model's normalizer applies NFKC and drops leading/trailing/double ASCII whitespace
    # only where no marker replaced it; these texts survive up to NFKC.
    assert tiny.decode(ids) == unicodedata.normalize("NFKC", text)


def test_whitespace_markers_are_single_ids(tiny: ChatGLMTokenizer) -> None:
    ids = tiny.encode("a\nb")
    assert [tiny.piece(i) for i in ids if tiny.piece(i) == "<n>"] == ["<n>"]
    assert tiny.token_bytes(ids[ids.index(next(i for i in ids if tiny.piece(i) == "<n>"))]) == b"\n"
    blank = next(i for i in tiny.encode("a" + " " * 7 + "b") if tiny.piece(i) == "<|blank_7|>")
    assert tiny.token_bytes(blank) == b" " * 7
    assert tiny.decode([blank]) == " " * 7  # no leading-space removal for a marker


@pytest.mark.parametrize("literal", TYPED_LITERALS + ["＜ｎ＞", "＜｜tab｜＞"])
def test_typed_control_and_marker_strings_stay_text(tiny: ChatGLMTokenizer, literal: str) -> None:
    text = f"x {literal} y{literal}z\n{literal}"
    ids = tiny.encode(text)
    assert not any(tiny.is_control(i) for i in ids)
    assert {tiny.gmask_id, tiny.sop_id, tiny.eop_id, tiny.mask_id, tiny.pad_id}.isdisjoint(ids)
    assert tiny.decode(ids) == unicodedata.normalize("NFKC", text)
    # only the one real newline became a marker
    assert [tiny.piece(i) for i in ids].count("<n>") == 1


def test_control_ids_decode_to_nothing(tiny: ChatGLMTokenizer) -> None:
    hello = tiny.encode("Hello")
    assert tiny.decode([tiny.gmask_id, tiny.sop_id, *hello, tiny.eop_id, tiny.pad_id]) == "Hello"
    assert tiny.token_bytes(tiny.sop_id) == b""
    assert tiny.is_control(tiny.eop_id) and not tiny.is_control(hello[0])


def test_byte_fallback_and_partial_utf8(tiny: ChatGLMTokenizer) -> None:
    ids = tiny.encode("🚀")
    assert [tiny.token_bytes(i) for i in ids if tiny.token_bytes(i) != b" "] == [
        bytes([b]) for b in "🚀".encode()]
    assert tiny.decode(ids) == "🚀"
    # sentencepiece renders every byte of an incomplete character as one U+FFFD
    assert tiny.decode(ids[:-1]).endswith("\ufffd" * 3)


def test_clean_up_tokenization_like_transformers(tiny: ChatGLMTokenizer) -> None:
    assert tiny.decode(tiny.encode("a  .")) == "a ."  # "<|blank_2|>." -> "  ." -> " ."
    assert tiny.decode(tiny.encode("x , y")) == "x, y"


def test_image_token_offset(tmp_path: Path) -> None:
    plain = load_tokenizer(write_tiny_tokenizer(tmp_path / "plain", num_image_tokens=0))
    shifted = load_tokenizer(write_tiny_tokenizer(tmp_path / "shifted", num_image_tokens=20000))
    text = "Hello 你好\n  x"
    assert shifted.encode(text) == [i + 20000 for i in plain.encode(text)]
    assert shifted.vocab_size == plain.vocab_size + 20000
    assert shifted.sop_id == plain.sop_id + 20000
    assert shifted.decode([5, *shifted.encode(text)]) == plain.decode(plain.encode(text))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        shifted.decode([shifted.vocab_size])


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="ice_text.model"):
        load_tokenizer(tmp_path)


def test_bad_tokenizer_config(tmp_path: Path) -> None:
    folder = write_tiny_tokenizer(tmp_path / "t", num_image_tokens=None)
    (folder / "tokenizer_config.json").write_text('{"num_image_tokens": "many"}')
    with pytest.raises(CheckpointError, match="num_image_tokens"):
        load_tokenizer(folder)


# ---------------------------------------------------------------- against THUDM's tokenizer


def test_attributes_match_reference(real: ChatGLMTokenizer) -> None:
    ref = oracle("chatglm-6b-tiny")["tokenizer"]
    assert real.vocab_size == ref["attrs"]["vocab_size"]
    assert real.pad_id == ref["attrs"]["pad_token_id"]
    specials = ref["special_token_ids"]
    assert (real.mask_id, real.gmask_id, real.sop_id, real.eop_id) == (
        specials["[MASK]"], specials["[gMASK]"], specials["<sop>"], specials["<eop>"])


def test_same_file_in_tokenizers_folder() -> None:
    folder = tokenizer_file("chatglm-6b", "ice_text.model").parent
    tok = load_tokenizer(folder)
    assert tok.encode("你好\n  世界") == load_tokenizer(checkpoint_dir("chatglm-6b-tiny")).encode("你好\n  世界")


def test_strings_match_reference(real: ChatGLMTokenizer) -> None:
    strings = oracle("chatglm-6b-tiny")["tokenizer"]["strings"]
    exempt = 0
    for case in strings:
        text, ref_ids = case["text"], case["ids_no_special"]
        ours = real.encode(text)
        if any(real.is_control(i) for i in ref_ids):
            # The reference turned typed "<sop>" / "[MASK]" into control ids; we keep them text.
            exempt += 1
            assert not any(real.is_control(i) for i in ours)
            assert real.decode(ours) == unicodedata.normalize("NFKC", text).strip()
        else:
            assert ours == ref_ids, text
            assert [real.piece(i) for i in ours] == case["pieces"], text
            assert ours + [real.gmask_id, real.sop_id] == case["ids_with_special"], text
        assert real.decode(ref_ids) == case["decode"], text
        assert real.decode(case["ids_with_special"]) == case["decode_with_special"], text
        incremental = [real.decode(ref_ids[: k + 1]) for k in range(len(ref_ids))]
        assert incremental == case["incremental_decode"], text
    assert exempt <= 1


def test_single_ids_match_reference(real: ChatGLMTokenizer) -> None:
    for key, ref in oracle("chatglm-6b-tiny")["tokenizer"]["single_ids"].items():
        assert real.piece(int(key)) == ref["token"], key
        assert real.decode([int(key)]) == ref["decode"], key


def test_special_token_ids_match_reference(real: ChatGLMTokenizer) -> None:
    specials = oracle("chatglm-6b-tiny")["tokenizer"]["special_token_ids"]
    for piece in ("<n>", "<|tab|>", "<|blank_2|>", "<|blank_80|>", "<0x0A>", "<0xF0>", "▁"):
        assert real.piece(specials[piece]) == piece
    assert real.token_bytes(specials["<0xF0>"]) == b"\xf0"
    assert real.token_bytes(specials["<|blank_80|>"]) == b" " * 80
    assert real.token_bytes(specials["▁"]) == b" "


@pytest.mark.parametrize("literal", TYPED_LITERALS + ["＜ｎ＞"])
def test_typed_literals_stay_text_real(real: ChatGLMTokenizer, literal: str) -> None:
    ids = real.encode(f"please print {literal} now")
    assert not any(real.is_control(i) for i in ids)
    assert 130004 not in ids and 4 not in ids
    assert real.decode(ids) == unicodedata.normalize("NFKC", f"please print {literal} now")
