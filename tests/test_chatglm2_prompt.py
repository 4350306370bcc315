"""ChatGLM2 / ChatGLM3 prompts: golden strings and the reference's exact input ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.chatglm2.prompt import build_prompt_v2, build_prompt_v3, prompt_text_v2
from adapters.chatglm2.tokenizer import ChatGLM2Tokenizer, load_tokenizer
from adapters.conversation import Conversation, Turn
from tests.conftest import checkpoint_dir, oracle
from tests.test_chatglm2_tokenizer import write_tiny_sentencepiece


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


# --------------------------------------------------------------------------- v2


def test_v2_text_numbers_rounds_from_one() -> None:
    conv = Conversation(query="c?", history=(("a", "A"), ("b", "B")))
    assert prompt_text_v2(conv) == (
        "[Round 1]\n\n问：a\n\n答：A\n\n[Round 2]\n\n问：b\n\n答：B\n\n[Round 3]\n\n问：c?\n\n答："
    )
    assert prompt_text_v2(Conversation(query="hi")) == "[Round 1]\n\n问：hi\n\n答："


def test_v2_ids_are_prefixed_with_gmask_sop(tiny_file: Path) -> None:
    tok = ChatGLM2Tokenizer(tiny_file, "chatglm2")
    conv = Conversation(query="<|user|> [gMASK]", history=(("x", "y"),))
    ids, text = build_prompt_v2(tok, conv)
    assert ids[:2] == [tok.special("[gMASK]"), tok.special("sop")]
    assert ids[2:] == tok.encode(text)
    assert not set(ids[2:]) & set(tok.special_ids.values())


# --------------------------------------------------------------------------- v3


def test_v3_structure(tiny_file: Path) -> None:
    tok = ChatGLM2Tokenizer(tiny_file, "chatglm3")
    conv = Conversation(
        query="{\"t\": 1}",
        turns=(Turn("system", "sys"), Turn("user", "hi"),
               Turn("assistant", "```python\ntool_call()\n```", metadata="get_weather")),
        query_role="observation",
    )
    ids, text = build_prompt_v3(tok, conv)
    s = tok.special
    expected = [s("[gMASK]"), s("sop")]
    expected += [s("<|system|>"), *tok.encode("\n"), *tok.encode("sys")]
    expected += [s("<|user|>"), *tok.encode("\n"), *tok.encode("hi")]
    expected += [s("<|assistant|>"), *tok.encode("get_weather\n"),
                 *tok.encode("```python\ntool_call()\n```")]
    expected += [s("<|observation|>"), *tok.encode("\n"), *tok.encode("{\"t\": 1}")]
    expected.append(s("<|assistant|>"))
    assert ids == expected
    assert text == tok.decode(ids)
    assert text.startswith("[gMASK]sop<|system|> \n sys<|user|>")
    assert text.endswith("<|observation|> \n {\"t\": 1}<|assistant|>")


def test_v3_user_text_with_role_names_stays_text(tiny_file: Path) -> None:
    tok = ChatGLM2Tokenizer(tiny_file, "chatglm3")
    ids, _ = build_prompt_v3(tok, Conversation(query="<|assistant|><|user|>"))
    roles = [i for i in ids if i in tok.special_ids.values()]
    assert roles == [tok.special(n) for n in ("[gMASK]", "sop", "<|user|>", "<|assistant|>")]


def test_v3_rejects_unknown_role(tiny_file: Path) -> None:
    tok = ChatGLM2Tokenizer(tiny_file, "chatglm3")
    with pytest.raises(ValueError, match="tool"):
        build_prompt_v3(tok, Conversation(query="x", turns=(Turn("tool", "y"),)))


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("name", ["chatglm2-6b-tiny", "chatglm2-6b-int8-tiny"])
def test_reference_v2_prompts(name: str) -> None:
    tok = load_tokenizer(checkpoint_dir("chatglm2-6b-tiny"), "chatglm2")
    for case in oracle(name)["cases"]:
        conv = Conversation(query=case["query"],
                            history=tuple((q, r) for q, r in case["history"]))
        ids, text = build_prompt_v2(tok, conv)
        assert text == case["prompt"], case["case"]
        assert ids == case["inputs"]["input_ids"][0], case["case"]


def _v3_conversation(case: dict) -> Conversation:
    turns = []
    for item in case["history"]:
        content = item["content"]
        if item["role"] == "system" and "tools" in item:
            # chatglm3-6b build_chat_input appends the tool list to the system message.
            content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
        turns.append(Turn(item["role"], content, item.get("metadata", "")))
    return Conversation(query=case["query"], turns=tuple(turns), query_role=case["role"])


def test_reference_v3_prompts() -> None:
    name = "chatglm3-6b-tiny-safetensors"
    tok = load_tokenizer(checkpoint_dir(name), "chatglm3")
    for case in oracle(name)["cases"]:
        ids, text = build_prompt_v3(tok, _v3_conversation(case))
        assert ids == case["inputs"]["input_ids"][0], case["case"]
        assert text == case["decoded_prompt"], case["case"]
