"""ChatGLM-6B's answer post-processing, one-shot and streaming.

THUDM/chatglm-6b ``modeling_chatglm.py`` ``process_response``: strip, ``[[训练时间]]`` ->
``2023年``, then for each of ``, ! : ; ?`` in that order two regex passes: an ASCII mark right
after a CJK character ([\\u4e00-\\u9fff]) becomes full width, then one right before a CJK character.

Neither pass changes which characters are CJK, and a match never needs a character another
match consumed, so the passes amount to one rule the streaming version applies character by
character: *an ASCII mark with a CJK neighbour on either side becomes full width*.
"""

from __future__ import annotations

import re

from adapters.base import ToolCall
from adapters.runtime.detokenize import held_suffix

TRAINING_TIME = "[[训练时间]]"
TRAINING_TIME_VALUE = "2023年"
# (ASCII regex, full width), in the reference order.
_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))
_WIDE = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
_CJK = "[\u4e00-\u9fff]"


def process_response(text: str) -> str:
    """The reference ``process_response``, pass for pass."""
    text = text.strip()
    text = text.replace(TRAINING_TIME, TRAINING_TIME_VALUE)
    for ascii_mark, wide in _PUNCTUATION:
        text = re.sub(rf"({_CJK}){ascii_mark}", rf"\1{wide}", text)
        text = re.sub(rf"{ascii_mark}({_CJK})", rf"{wide}\1", text)
    return text


def _is_cjk(char: str | None) -> bool:
    return char is not None and "\u4e00" <= char <= "\u9fff"


class ChatGLMStreamPostprocessor:
    """:class:`adapters.family.StreamPostprocessor` for ChatGLM-6B.

    Holds back only what a later character could still change: leading whitespace (stripped),
    trailing whitespace (stripped if nothing follows), a partial ``[[训练时间]]`` and a final
    ASCII mark whose width depends on the next character.  Text once returned is final.
    """

    def __init__(self, tools: bool = False) -> None:  # ChatGLM-6B has no tool format
        self._pending = ""  # raw text not yet returned
        self._last: str | None = None  # last character returned (after rewriting)
        self._started = False  # something non-blank has been returned (the strip() start)
        self.tool_calls: tuple[ToolCall, ...] = ()

    def feed(self, text: str) -> str:
        self._pending += text
        if not self._started:
            self._pending = self._pending.lstrip()
        pending = self._pending
        if not pending:
            return ""
        held = held_suffix(pending, (TRAINING_TIME,))
        # Whitespace before a held "[[..." is not trailing: only hold it when nothing is held.
        cut = len(pending) - held if held else len(pending.rstrip())
        if cut == len(pending) and pending[-1] in _WIDE and not _is_cjk(self._before(pending, cut - 1)):
            cut -= 1  # its width depends on the next character
        return self._emit(cut)

    def finish(self) -> str:
        if not self._started:
            self._pending = self._pending.lstrip()
        self._pending = self._pending.rstrip()
        return self._emit(len(self._pending))

    def _before(self, pending: str, index: int) -> str | None:
        """The character before ``pending[index]`` once rewritten (only CJK-ness matters)."""
        if index > 0:
            # "[[训练时间]]" ends in "]" and its replacement in "年": the CJK-ness can differ.
            return "年" if pending[:index].endswith(TRAINING_TIME) else pending[index - 1]
        return self._last

    def _emit(self, cut: int) -> str:
        if cut <= 0:
            return ""
        segment, self._pending = self._pending[:cut], self._pending[cut:]
        # The next character decides the width of a final mark; a held "[[训练时间]]" or
        # whitespace starts with a non-CJK character either way.
        following = self._pending[0] if self._pending else None
        segment = segment.replace(TRAINING_TIME, TRAINING_TIME_VALUE)
        out: list[str] = []
        previous = self._last
        for i, char in enumerate(segment):
            if char in _WIDE:
                after = segment[i + 1] if i + 1 < len(segment) else following
                if _is_cjk(previous) or _is_cjk(after):
                    char = _WIDE[char]
            out.append(char)
            previous = char
        result = "".join(out)
        if result:
            self._started = True
            self._last = result[-1]
        return result
