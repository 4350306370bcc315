"""ChatGLM-6B prompts exactly as THUDM's chat() builds them, and the family row."""

from __future__ import annotations

from pathlib import Path

from adapters.chatglm import SPEC, build_prompt, prompt_text
from adapters.chatglm.postprocess import ChatGLMStreamPostprocessor
from adapters.chatglm.tokenizer import load_tokenizer
from adapters.conversation import Conversation, to_pairs
from adapters.registry import FAMILIES
from tests.conftest import checkpoint_dir, oracle
from tests.test_chatglm_tokenizer import write_tiny_tokenizer


def test_no_history_is_the_bare_query() -> None:
    assert prompt_text(Conversation(query="你好")) == "你好"


def test_rounds_count_from_zero_with_single_newlines() -> None:
    conv = Conversation(query="q2", history=(("q0", "r0"), ("q1", "r1")))
    assert prompt_text(conv) == (
        "[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q1\n答：r1\n[Round 2]\n问：q2\n答："
    )


def test_ids_end_with_gmask_sop(tmp_path: Path) -> None:
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    conv = Conversation(query="say <sop> [gMASK]", history=(("hi", "hello"),))
    ids, text = build_prompt(tok, conv)
    assert text == prompt_text(conv)
    assert ids[-2:] == [tok.gmask_id, tok.sop_id]
    assert ids[:-2] == tok.encode(text)
    # the only control ids are the two appended ones: typed ones stayed text
    assert [i for i in ids if tok.is_control(i)] == [tok.gmask_id, tok.sop_id]


def test_family_row() -> None:
    assert FAMILIES["chatglm"] is SPEC
    assert SPEC.to_conversation is to_pairs
    assert SPEC.stop_ids == frozenset({130005})
    assert SPEC.build_prompt is build_prompt
    assert isinstance(SPEC.new_postprocessor(), ChatGLMStreamPostprocessor)
    assert not SPEC.drop_last_token_on_length


def test_reference_prompts_and_input_ids() -> None:
    folder = checkpoint_dir("chatglm-6b-tiny")
    assert SPEC.load_tokenizer is load_tokenizer
    tok = load_tokenizer(folder)
    config = SPEC.read_config(folder)
    assert SPEC.stop_ids == {tok.eop_id} == {config.eos_token_id}
    for case in oracle("chatglm-6b-tiny")["cases"]:
        conv = Conversation(query=case["query"], history=tuple(map(tuple, case["history"])))
        ids, text = SPEC.build_prompt(tok, conv)
        assert text == case["prompt"], case["case"]
        assert ids == case["inputs"]["input_ids"][0], case["case"]
        assert [tok.piece(i) for i in ids] == case["input_tokens"], case["case"]
