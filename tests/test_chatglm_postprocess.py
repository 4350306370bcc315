"""ChatGLM-6B process_response, one-shot and streaming."""

from __future__ import annotations

import random

import pytest

from adapters.chatglm.postprocess import ChatGLMStreamPostprocessor, process_response
from adapters.chatglm.tokenizer import load_tokenizer
from tests.conftest import checkpoint_dir, oracle


@pytest.mark.parametrize(("raw", "expected"), [
    ("  hello  ", "hello"),
    ("你好,世界!", "你好，世界！"),
    ("中文:说明;问题?", "中文：说明；问题？"),
    ("Hi, there! a:b; c?", "Hi, there! a:b; c?"),
    (",中", "，中"),
    ("中,,文", "中，，文"),  # one mark after a CJK char, one before
    ("a,,中", "a,，中"),
    ("中,,,a", "中，,,a"),
    (",中,中,", "，中，中，"),
    ("中 ,", "中 ,"),  # a space between: no widening
    ("训练于[[训练时间]],结束", "训练于2023年，结束"),
    ("[[[训练时间]]]", "[2023年]"),
    ("\n[[训练时间]]!\t", "2023年！"),
    ("中.", "中."),  # only , ! : ; ? are widened
])
def test_process_response(raw: str, expected: str) -> None:
    assert process_response(raw) == expected


def _stream(raw: str, cuts: list[int]) -> tuple[str, list[str]]:
    pp = ChatGLMStreamPostprocessor()
    pieces: list[str] = []
    start = 0
    for cut in [*cuts, len(raw)]:
        pieces.append(pp.feed(raw[start:cut]))
        start = cut
    pieces.append(pp.finish())
    return "".join(pieces), pieces


def test_stream_equals_one_shot_for_random_splits() -> None:
    alphabet = list(" \t\n,!:;?.中文年ab2[]训练时间\u3000") + ["[[训练时间]]", "[[训练"]
    rng = random.Random(1234)
    for _ in range(4000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        cuts = sorted(rng.sample(range(len(raw) + 1), k=min(len(raw) + 1, rng.randint(0, 6))))
        expected = process_response(raw)
        got, pieces = _stream(raw, cuts)
        assert got == expected, (raw, cuts, pieces)
        # what was returned is never taken back: every running total is a prefix of the result
        total = ""
        for piece in pieces:
            total += piece
            assert expected.startswith(total), (raw, cuts, pieces)


def test_stream_holds_back_only_what_can_change() -> None:
    pp = ChatGLMStreamPostprocessor()
    assert pp.feed("  ") == ""  # leading whitespace is stripped
    assert pp.feed("你好") == "你好"  # nothing later can change this
    assert pp.feed(",") == "，"  # after a CJK char: already decided
    assert pp.feed(" a,") == " a"  # the mark waits for the next character
    assert pp.feed("中") == "，中"
    assert pp.feed(" [[训练") == " "
    assert pp.feed("时间]]  ") == "2023年"  # trailing whitespace waits
    assert pp.feed("x") == "  x"
    assert pp.feed("!\n") == "!"  # a space follows, so the mark stays ASCII
    assert pp.finish() == ""


def test_stream_finish_releases_partial_pattern_and_mark() -> None:
    pp = ChatGLMStreamPostprocessor()
    assert pp.feed("ok [[训练") == "ok "
    assert pp.feed(",") == "[[训练，"  # "练" is CJK
    assert pp.feed("a?") == "a"
    assert pp.finish() == "?"


def test_reference_chat_and_stream_responses() -> None:
    tok = load_tokenizer(checkpoint_dir("chatglm-6b-tiny"))
    for case in oracle("chatglm-6b-tiny")["cases"]:
        ids = case["greedy_new_ids"]
        assert process_response(tok.decode(ids)) == case["chat_response"]
        # stream_chat yields process_response(decode(ids so far)) after every token but the last
        for k, response in enumerate(case["stream_chat_responses"]):
            assert process_response(tok.decode(ids[: k + 1])) == response
        # our streaming post-processor over the decoded growth gives the same final answer
        pp = ChatGLMStreamPostprocessor()
        out, previous = "", ""
        for k in range(len(ids)):
            text = tok.decode(ids[: k + 1])
            assert text.startswith(previous)
            out += pp.feed(text[len(previous):])
            previous = text
        assert out + pp.finish() == case["chat_response"]
