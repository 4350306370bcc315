"""chat() answer post-processing: streamed pieces concatenate to the one-shot answer."""

from __future__ import annotations

import random

import pytest

from adapters.chatglm2 import V2_SPEC, V3_SPEC
from adapters.chatglm2.postprocess import (
    ChatGLM2Postprocessor,
    ChatGLM3Postprocessor,
    process_response_v2,
    process_response_v3,
)
from adapters.chatglm2.tokenizer import load_tokenizer
from tests.conftest import checkpoint_dir, oracle

ATOMS = [" ", "  ", "\n", "\t", "\u3000", "a", "b", "中", "[", "[[", "训练", "时间", "]]", "]",
         "[[训练时间]]", "[[训练", "get_weather", "```python", "x\n"]


def stream(post: ChatGLM2Postprocessor | ChatGLM3Postprocessor, pieces: list[str]) -> str:
    out = [post.feed(p) for p in pieces]
    out.append(post.finish())
    return "".join(out)


def random_splits(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) \
        if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] + [""] * rng.randint(0, 1)


def test_one_shot_examples() -> None:
    assert process_response_v2("  hi [[训练时间]] there \n") == "hi 2023年 there"
    assert process_response_v3("\n  answer [[训练时间]]  ") == "answer 2023年"
    assert process_response_v3("no newline  ") == "no newline"
    # A tool call: the first line names the tool; the content stays as generated.
    tool = "get_weather\n```python\ntool_call(city='北京')\n```\n"
    assert process_response_v3(tool) == "```python\ntool_call(city='北京')\n```\n"


@pytest.mark.parametrize("seed", range(5))
def test_streaming_equals_one_shot(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        text = "".join(rng.choice(ATOMS) for _ in range(rng.randint(0, 12)))
        pieces = random_splits(rng, text)
        assert stream(ChatGLM2Postprocessor(), pieces) == process_response_v2(text), pieces
        assert stream(ChatGLM3Postprocessor(), pieces) == process_response_v3(text), pieces


def test_v2_holds_back_trailing_whitespace_and_partial_placeholder() -> None:
    post = ChatGLM2Postprocessor()
    assert post.feed("  ") == ""
    assert post.feed(" ab ") == "ab"
    assert post.feed("[[训") == " "
    assert post.feed("练时间]] x") == "2023年 x"
    assert post.feed("[[训") == ""
    assert post.finish() == "[[训"


def test_v3_waits_for_first_newline_then_streams() -> None:
    post = ChatGLM3Postprocessor()
    assert post.feed("Hello wor") == ""
    # Metadata "Hello world" is non-blank: a tool line, so the content streams unstripped.
    assert post.feed("ld\n more ") == " more "
    assert post.metadata == "Hello world"
    assert post.feed("text ") == "text "
    assert post.finish() == ""
    plain = ChatGLM3Postprocessor()
    assert plain.feed("\n  answer") == "answer"
    assert plain.metadata == ""
    assert plain.feed("  ") == ""
    assert plain.finish() == ""


def test_v3_without_newline_releases_at_finish() -> None:
    post = ChatGLM3Postprocessor()
    assert post.feed("  just text ") == ""
    assert post.finish() == "just text"
    assert post.metadata == ""


def test_family_rows_make_fresh_postprocessors() -> None:
    a, b = V2_SPEC.new_postprocessor(), V2_SPEC.new_postprocessor()
    assert a is not b
    assert isinstance(V3_SPEC.new_postprocessor(), ChatGLM3Postprocessor)


@pytest.mark.parametrize("name,version,drop_last", [
    ("chatglm2-6b-tiny", "chatglm2", False),
    ("chatglm3-6b-tiny-safetensors", "chatglm3", True),
])
def test_reference_chat_responses(name: str, version: str, drop_last: bool) -> None:
    tok = load_tokenizer(checkpoint_dir(name), version)  # type: ignore[arg-type]
    one_shot = process_response_v3 if version == "chatglm3" else process_response_v2
    for case in oracle(name)["cases"]:
        ids = case["greedy_new_ids"]
        if drop_last:  # the 16-token limit cut the answer: chatglm3 chat() drops the last id
            ids = ids[:-1]
        assert one_shot(tok.decode(ids)) == case["chat_response"], case["case"]
        post = ChatGLM3Postprocessor() if version == "chatglm3" else ChatGLM2Postprocessor()
        streamed = stream(post, [tok.decode(ids[: k + 1])[len(tok.decode(ids[:k])):]
                                 for k in range(len(ids))])
        assert streamed == case["chat_response"], case["case"]
