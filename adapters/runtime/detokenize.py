"""Incremental, UTF-8-safe detokenization and the stop-string matcher.

``IncrementalDecoder`` follows text-generation-inference's ``decode_token``: decode a short window
twice (``ids[prefix:read]`` and ``ids[prefix:]``) and emit the difference, but only when it does not
end in U+FFFD (an incomplete byte-fallback sequence such as the first bytes of an emoji).  SentencePiece
drops the leading space of the first piece it decodes, which the window difference cancels out, so
the emitted pieces concatenate to ``decode(all_ids)``.

Text ending in a space is held back one more token too: ChatGLM-6B's ``decode`` applies
transformers' ``clean_up_tokenization`` (" ." -> ".", " n't" -> "n't"), so a trailing space may
still vanish when the next piece arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from adapters.base import ToolCall

REPLACEMENT = "\ufffd"


class _Decodes(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDecoder:
    def __init__(self, tokenizer: _Decodes):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the new text that is complete so far (possibly "")."""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith((REPLACEMENT, " ")):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete sequence at the very end decodes as U+FFFD,
        exactly as the reference ``tokenizer.decode`` renders it)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else ""


class StopMatcher:
    """Finds stop strings across piece boundaries.  Text that could still be the start of a stop
    string is held back; a found stop string and everything after it is never emitted."""

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(s for s in stops if s)
        self._buf = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._buf += text
        hits = [i for i in (self._buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._buf = self._buf[: min(hits)], ""
            return out
        hold = held_suffix(self._buf, self._stops)
        out = self._buf[: len(self._buf) - hold]
        self._buf = self._buf[len(self._buf) - hold :]
        return out

    def flush(self) -> str:
        out, self._buf = ("" if self.stopped else self._buf), ""
        return out


def held_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``patterns``:
    how much streamed text must be held back because the next piece may complete a pattern (a
    stop string, a placeholder a family's post-processing rewrites)."""
    best = 0
    for pattern in patterns:
        for n in range(min(len(pattern) - 1, len(text)), best, -1):
            if text.endswith(pattern[:n]):
                best = n
                break
    return best


class StripText:
    """A :class:`~adapters.family.StreamPostprocessor` for ``text.strip()``, as every family's
    ``process_response`` starts, optionally followed by ``.replace(old, new)`` (``replace``).

    Leading whitespace is dropped; trailing whitespace and a trailing partial ``old`` are held
    back until more text shows what they are.
    """

    def __init__(self, replace: tuple[str, str] | None = None) -> None:
        self._replace = replace
        self._pending = ""
        self._started = False  # a non-whitespace character has been seen
        self.tool_calls: tuple[ToolCall, ...] = ()

    def feed(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        pending = self._pending + text
        out: list[str] = []
        held = 0
        if self._replace is not None:
            old, new = self._replace
            while (i := pending.find(old)) >= 0:
                out.append(pending[:i] + new)
                pending = pending[i + len(old):]
            # str.replace scans left to right: a match can only still start in the held tail.
            held = held_suffix(pending, (old,))
        hold = min(len(pending.rstrip()), len(pending) - held)
        out.append(pending[:hold])
        self._pending = pending[hold:]
        return "".join(out)

    def finish(self) -> str:
        rest = self._pending.rstrip()
        self._pending = ""
        return rest  # a held partial ``old`` never completed: it is plain text
