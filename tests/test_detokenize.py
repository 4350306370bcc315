from __future__ import annotations

import random

import pytest

from adapters.runtime.detokenize import REPLACEMENT, IncrementalDecoder, StopMatcher
from tests.toys import ByteTokenizer

TEXTS = ["Hello, world", "你好，世界！", "Emoji 😀🚀🇨🇳 end", "👨‍👩‍👧 family", "tab\tand\nnewline"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_never_splits_a_character(text: str) -> None:
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    assert all(REPLACEMENT not in p for p in pieces)


class CleanUpTokenizer(ByteTokenizer):
    """Decodes like transformers' clean_up_tokenization: a space before "." disappears."""

    def decode(self, ids):  # type: ignore[no-untyped-def]
        return super().decode(ids).replace(" .", ".").replace(" ,", ",")


def test_space_that_a_later_piece_removes_is_never_sent() -> None:
    tok = CleanUpTokenizer()
    for text in ["Hi . there , ok .", "a  .", "end "]:
        dec = IncrementalDecoder(tok)
        ids = tok.encode(text)
        out = "".join(dec.push(i) for i in ids) + dec.flush()
        assert out == tok.decode(ids)


def test_flush_keeps_an_incomplete_tail_like_the_reference_decode() -> None:
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    ids = tok.encode("ok😀")[:-1]  # the emoji is cut short
    out = "".join(dec.push(i) for i in ids)
    assert out == "ok"
    assert out + dec.flush() == tok.decode(ids)


def test_stop_string_across_pieces_is_never_emitted() -> None:
    m = StopMatcher(["###", "END"])
    out = m.feed("abc#") + m.feed("#") + m.feed("#tail")
    assert out == "abc"
    assert m.stopped
    assert m.feed("more") == "" and m.flush() == ""


def test_partial_stop_is_released_when_it_does_not_complete() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("go ST") == "go "
    assert m.feed("ART") == "START"
    assert m.flush() == ""
    assert not m.stopped


def test_earliest_stop_wins() -> None:
    m = StopMatcher(["b", "abc"])
    assert m.feed("xxabc") == "xx"  # "abc" starts before "b"


def test_stop_matcher_random_splits_equal_one_shot() -> None:
    rng = random.Random(7)
    stops = ["\n\n", "用户", "</s>"]
    for _ in range(300):
        text = "".join(rng.choice(["a", "\n", "用", "户", "<", "/s>", " "]) for _ in range(30))
        cut = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[: min(cut)] if cut else text
        m = StopMatcher(stops)
        pos, out = 0, ""
        while pos < len(text):
            step = rng.randint(1, 4)
            out += m.feed(text[pos : pos + step])
            pos += step
        out += m.flush()
        assert out == expected
