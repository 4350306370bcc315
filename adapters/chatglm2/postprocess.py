"""The official chat() answer post-processing of ChatGLM2-6B and ChatGLM3-6B, one-shot and
streaming.  The streaming classes implement :class:`adapters.family.StreamPostprocessor`: the
concatenation of everything ``feed``/``finish`` return equals the one-shot function.
"""

from __future__ import annotations

from adapters.base import ToolCall
from adapters.chatglm2.tools import parse_call
from adapters.runtime.detokenize import StripText

#: Both models' process_response rewrite this placeholder (modeling_chatglm.py).
PLACEHOLDER = "[[训练时间]]"
REPLACEMENT = "2023年"


def process_response_v2(text: str) -> str:
    """chatglm2-6b ``process_response``: strip, then replace the training-time placeholder."""
    return text.strip().replace(PLACEHOLDER, REPLACEMENT)


def split_metadata(text: str) -> tuple[str, str]:
    """chatglm3-6b ``process_response``: the first line is metadata (a tool name) when the
    output has a newline, else there is no metadata."""
    if "\n" in text:
        metadata, content = text.split("\n", 1)
        return metadata, content
    return "", text


def process_response_v3(text: str) -> str:
    """chatglm3-6b ``process_response`` reduced to text.

    Blank metadata: the content is stripped and the placeholder replaced, as in v2.  Non-blank
    metadata (a tool call, ``{name}\\n```python\\ntool_call(...)\\n```\\n``): the reference returns
    ``{"name": metadata, ...}`` built from the *unstripped* content; here the content comes back
    unstripped and unreplaced, and the tool name is available as the postprocessor's
    ``metadata``.  Not reproduced: the reference also splits the text on a decoded
    ``<|assistant|>`` and keeps only the last part.
    """
    metadata, content = split_metadata(text)
    if metadata.strip():
        return content
    return process_response_v2(content)


class StripReplace(StripText):
    """Streaming ``text.strip().replace(PLACEHOLDER, REPLACEMENT)``."""

    def __init__(self, tools: bool = False) -> None:  # no tool format: ``tools`` is unused
        super().__init__((PLACEHOLDER, REPLACEMENT))


class ChatGLM2Postprocessor(StripReplace):
    """ChatGLM2-6B: :func:`process_response_v2`, streamed."""


class ChatGLM3Postprocessor:
    """ChatGLM3-6B: :func:`process_response_v3`, streamed.

    Everything is held until the first ``"\n"`` (or the end) decides whether the first line
    is metadata; after a blank one the content streams through :class:`StripReplace`, after a
    tool name it streams verbatim — unless the request offered tools (``tools=True``): then the
    whole call is held and, if it parses, comes out as ``tool_calls`` instead of text.
    """

    def __init__(self, tools: bool = False) -> None:
        self._tools = tools
        self._head = ""
        self.metadata: str | None = None  # known once the first newline (or the end) is seen
        self._content: StripReplace | None = None
        self._call = ""  # a tool call's content, held until the end
        self.tool_calls: tuple[ToolCall, ...] = ()

    def feed(self, text: str) -> str:
        if self.metadata is None:
            self._head += text
            if "\n" not in self._head:
                return ""
            self.metadata, text = self._head.split("\n", 1)
            self._head = ""
            if not self.metadata.strip():
                self._content = StripReplace()
        if self._content is not None:
            return self._content.feed(text)
        if self._tools:
            self._call += text
            return ""
        return text

    def finish(self) -> str:
        if self.metadata is None:
            self.metadata = ""
            return process_response_v2(self._head)
        if self._content is not None:
            return self._content.finish()
        if not self._tools:
            return ""
        call = parse_call(self.metadata, self._call)
        if call is None:  # not a well-formed call: the text as the model wrote it
            return self._call
        self.tool_calls = (call,)
        return ""
