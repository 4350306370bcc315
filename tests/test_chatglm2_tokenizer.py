"""ChatGLM2/3 tokenizer: THUDM's exact ids and decode, on the real file and on a tiny one."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm

from adapters.chatglm2 import EOS_ID, V2_SPEC, V3_OBSERVATION_ID, V3_SPEC, V3_USER_ID
from adapters.chatglm2.conversation import to_turns
from adapters.chatglm2.tokenizer import ChatGLM2Tokenizer, load_tokenizer
from adapters.conversation import to_pairs
from adapters.weights.checkpoint import CheckpointError
from tests.conftest import checkpoint_dir, oracle, tokenizer_file

REFERENCE_MODELS = [("chatglm2-6b-tiny", "chatglm2"), ("chatglm3-6b-tiny-safetensors", "chatglm3")]

CORPUS = [
    "Hello world, this is a tiny corpus for testing the tokenizer.",
    "你好，世界！今天天气很好。我们一起去公园吧。",
    "The quick brown fox jumps over the lazy dog.",
    "中文English混合123 4567",
    "def f(x): return x * 2",
]


def write_tiny_sentencepiece(folder: Path) -> Path:
    """Train a tiny BPE SentencePiece model shaped like THUDM's (byte fallback, dummy prefix,
    spaces kept) into ``folder/tokenizer.model``."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2,
    )
    path = folder / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


# --------------------------------------------------------------------------- tiny tokenizer


@pytest.mark.parametrize("version", ["chatglm2", "chatglm3"])
def test_special_ids_follow_the_piece_count(tiny_model_file: Path, version: str) -> None:
    tok = ChatGLM2Tokenizer(tiny_model_file, version)  # type: ignore[arg-type]
    n = spm.SentencePieceProcessor(model_file=str(tiny_model_file)).get_piece_size()
    assert [tok.special(s) for s in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")] == [
        n, n + 1, n + 2, n + 3, n + 4]
    if version == "chatglm3":
        roles = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
        assert [tok.special(r) for r in roles] == [n + 5, n + 6, n + 7, n + 8]
        assert tok.vocab_size == n + 9
    else:
        assert tok.vocab_size == n + 5
        with pytest.raises(KeyError, match="<|user|>"):
            tok.special("<|user|>")


@pytest.mark.parametrize("version", ["chatglm2", "chatglm3"])
def test_user_text_never_becomes_a_control_id(tiny_model_file: Path, version: str) -> None:
    tok = ChatGLM2Tokenizer(tiny_model_file, version)  # type: ignore[arg-type]
    text = "<s></s><unk>[gMASK] sop eop [MASK]<|user|><|assistant|><|observation|><|system|>"
    ids = tok.encode(text)
    controls = set(tok.special_ids.values()) | {tok.bos_id, tok.eos_id, tok.pad_id}
    assert not controls & set(ids)
    assert tok.decode(ids) == text


def test_decode_renders_control_ids_per_version(tiny_model_file: Path) -> None:
    v2 = ChatGLM2Tokenizer(tiny_model_file, "chatglm2")
    v3 = ChatGLM2Tokenizer(tiny_model_file, "chatglm3")
    hello = v2.encode("Hello world")
    prefix = [v2.special("[gMASK]"), v2.special("sop")]
    # chatglm2-6b: control tokens are "" so the first piece loses its dummy-prefix space.
    assert v2.decode(prefix + hello) == "Hello world"
    # chatglm3-6b: control tokens by name; the piece after them keeps its "▁" as a space.
    assert v3.decode(prefix + hello) == "[gMASK]sop Hello world"
    assert v3.decode([v3.special("<|user|>")]) == "<|user|>"
    for tok in (v2, v3):
        assert tok.decode([tok.eos_id, tok.bos_id, tok.pad_id]) == ""
        assert tok.decode([]) == ""


def test_token_bytes(tiny_model_file: Path) -> None:
    tok = ChatGLM2Tokenizer(tiny_model_file, "chatglm3")
    emoji = tok.encode("😀")
    byte_ids = [i for i in emoji if tok.piece(i).startswith("<0x")]
    assert b"".join(tok.token_bytes(i) for i in byte_ids) == "😀".encode()
    newline = tok.encode("a\nb")
    assert b"\n" in [tok.token_bytes(i) for i in newline]
    hello = tok.encode("Hello")
    assert tok.piece(hello[0]).startswith("\u2581")
    assert tok.token_bytes(hello[0]).startswith(b" ")
    assert tok.token_bytes(tok.special("<|user|>")) == b"<|user|>"
    assert tok.token_bytes(tok.eos_id) == b""
    v2 = ChatGLM2Tokenizer(tiny_model_file, "chatglm2")
    assert v2.token_bytes(v2.special("sop")) == b""


def test_incremental_decode_of_split_emoji_is_replacement_char(tiny_model_file: Path) -> None:
    tok = ChatGLM2Tokenizer(tiny_model_file, "chatglm2")
    ids = tok.encode("x😀")
    partial = tok.decode(ids[:-1])
    assert partial.endswith("\ufffd")
    assert tok.decode(ids) == "x😀"


def test_load_tokenizer_needs_tokenizer_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(tmp_path, "chatglm2")
    write_tiny_sentencepiece(tmp_path)
    assert load_tokenizer(tmp_path, "chatglm3").version == "chatglm3"
    with pytest.raises(ValueError, match="version"):
        load_tokenizer(tmp_path, "chatglm4")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("name,version", REFERENCE_MODELS)
def test_reference_strings(name: str, version: str) -> None:
    data = oracle(name)
    tok = load_tokenizer(checkpoint_dir(name), version)  # type: ignore[arg-type]
    assert tok.vocab_size == data["tokenizer"]["attrs"]["vocab_size"]
    for case in data["tokenizer"]["strings"]:
        ids = tok.encode(case["text"])
        assert ids == case["ids_no_special"], case["text"]
        assert [tok.piece(i) for i in ids] == case["pieces"], case["text"]
        assert tok.decode(ids) == case["decode"], case["text"]
        assert tok.decode(case["ids_with_special"]) == case["decode_with_special"], case["text"]
        prefixes = [tok.decode(ids[: k + 1]) for k in range(len(ids))]
        assert prefixes == case["incremental_decode"], case["text"]


@pytest.mark.parametrize("name,version", REFERENCE_MODELS)
def test_reference_single_ids_and_specials(name: str, version: str) -> None:
    data = oracle(name)
    tok = load_tokenizer(checkpoint_dir(name), version)  # type: ignore[arg-type]
    for token_id, expected in data["tokenizer"]["single_ids"].items():
        assert tok.piece(int(token_id)) == expected["token"], token_id
        assert tok.decode([int(token_id)]) == expected["decode"], token_id
    specials = data["tokenizer"]["special_token_ids"]
    for name_ in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>"):
        if specials[name_]:  # 0 = the reference tokenizer does not know this token
            assert tok.special(name_) == specials[name_]


@pytest.mark.parametrize("name,version", REFERENCE_MODELS)
def test_reference_greedy_text_decodes(name: str, version: str) -> None:
    data = oracle(name)
    tok = load_tokenizer(checkpoint_dir(name), version)  # type: ignore[arg-type]
    for case in data["cases"]:
        assert tok.decode(case["greedy_new_ids"]) == case["greedy_decoded"], case["case"]


def test_family_stop_ids_match_the_real_tokenizer_file() -> None:
    path = tokenizer_file("chatglm3-6b", "tokenizer.model")
    v3 = ChatGLM2Tokenizer(path, "chatglm3")
    assert EOS_ID == v3.eos_id
    assert (V3_USER_ID, V3_OBSERVATION_ID) == (v3.special("<|user|>"), v3.special("<|observation|>"))
    assert V3_SPEC.stop_ids == {v3.eos_id, v3.special("<|user|>"), v3.special("<|observation|>")}
    v2 = ChatGLM2Tokenizer(tokenizer_file("chatglm2-6b", "tokenizer.model"), "chatglm2")
    assert V2_SPEC.stop_ids == {v2.eos_id}
    assert (v2.vocab_size, v3.vocab_size) == (64794, 64798)


def test_family_rows_load_their_tokenizer(tmp_path: Path) -> None:
    write_tiny_sentencepiece(tmp_path)
    v2 = V2_SPEC.load_tokenizer(tmp_path)
    v3 = V3_SPEC.load_tokenizer(tmp_path)
    assert v3.vocab_size == v2.vocab_size + 4
    assert V3_SPEC.drop_last_token_on_length and not V2_SPEC.drop_last_token_on_length
    assert (V2_SPEC.to_conversation, V3_SPEC.to_conversation) == (to_pairs, to_turns)
