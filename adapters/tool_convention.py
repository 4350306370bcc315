"""Tool calls for families without a tool format of their own (ChatGLM-6B, ChatGLM2-6B).

THUDM trained neither model to call functions, so the gateway teaches it in the prompt and
holds it to the answer with a grammar (documented in the README, "Structured outputs and tools"):

* **Offer.** The first user turn is preceded by :data:`TOOLS_PROMPT` and the tool list as JSON
  (name, description, parameters), the way ChatGLM3's own tool prompt lists them.
* **Call.** A call is one line of JSON, ``{"name": "<tool>", "arguments": {...}}``; several calls
  (``parallel_tool_calls``) are several lines.  An answer is either such lines or plain text.
* **Constrain.** :func:`call_grammar` makes every call parse and its ``arguments`` follow the
  tool's ``parameters`` schema: with ``tool_choice`` ``"auto"`` the answer is text (not starting
  with ``{``) or calls; ``"required"`` or a named function allow calls only.
* **History.** An earlier assistant call is written back in the call format; a ``tool`` message
  becomes a user turn ``Result of <name>: <content>``, so the pair format (query, answer) holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from adapters.base import GrammarSpec, Message, Tool, ToolCall, ToolCallPart, ToolChoice
from adapters.family import StreamPostprocessor
from adapters.runtime.grammar import lark_json

TOOLS_PROMPT = (
    "You can call the following tools. To call a tool, answer with only one line of JSON per "
    'call: {"name": <tool name>, "arguments": <JSON object of its parameters>}. Otherwise '
    "answer normally.\nTools:"
)


def tool_entries(tools: Sequence[Tool]) -> list[dict[str, object]]:
    """The tools as a prompt lists them: name, and description and parameters when given (the
    shape of THUDM's ChatGLM3 tool prompts)."""
    listed = []
    for tool in tools:
        entry: dict[str, object] = {"name": tool.name}
        if tool.description:
            entry["description"] = tool.description
        if tool.parameters:
            entry["parameters"] = tool.parameters
        listed.append(entry)
    return listed


def tools_preamble(tools: Sequence[Tool]) -> str:
    """The text put before the first user turn when ``tools`` are offered."""
    return TOOLS_PROMPT + "\n" + json.dumps(tool_entries(tools), ensure_ascii=False)


def call_arguments(call: ToolCall) -> dict[str, object]:
    """An earlier call's arguments (a JSON object as text, "" for none); ValueError otherwise."""
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {call.name!r}: arguments must be a JSON object")
    return arguments


def call_line(call: ToolCall) -> str:
    """An earlier call as the model is asked to write it."""
    return json.dumps({"name": call.name, "arguments": call_arguments(call)},
                      ensure_ascii=False)


def assistant_text(message: Message) -> str:
    """An assistant message with calls, as the pair format's answer text."""
    lines = [message.content] if message.content else []
    return "\n".join(lines + [call_line(call) for call in message.tool_calls])


def tool_result_text(message: Message, names: dict[str, str]) -> str:
    """A ``tool`` message as the next user turn; ``names`` maps earlier call ids to names."""
    name = message.name or names.get(message.tool_call_id or "", "") or "the tool"
    return f"Result of {name}: {message.content}"


def call_grammar(tools: Sequence[Tool], choice: ToolChoice) -> GrammarSpec | None:
    """The grammar of an answer when ``tools`` are offered (None: no tools)."""
    if not tools:
        return None
    callable_ = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    calls = [
        {"type": "object",
         "properties": {"name": {"const": t.name},
                        "arguments": t.parameters or {"type": "object"}},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in callable_
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    # One call per line, each compact JSON.
    strict = all(t.strict for t in callable_)
    lines = 'call ("\\n" call)*' if choice.parallel else "call"
    body = f"calls: {lines}\ncall: {lark_json(schema, strict=strict)}\n"
    if choice.forced:
        start = "start: calls\n"
    else:
        # Text may not start with "{" (that is a call) nor with whitespace (the answer is
        # stripped, so " {" would read as a call that was never checked).
        start = "start: calls | TEXT\nTEXT: /[^{\\s][\\s\\S]*/\n"
    return GrammarSpec(kind="lark", value=start + body, strict=strict)


#: The start of a call line, up to its arguments (the grammar writes it compact; spaces are
#: allowed for answers made without one).
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def _call_head(line: str) -> tuple[str, int] | None:
    """(tool name, where the arguments start) once a call line has come that far."""
    match = _CALL_HEAD.match(line)
    if match is None:
        return None
    return json.loads(match.group(1)), match.end()


def parse_call_line(line: str) -> ToolCall | None:
    """One complete call line, or None when it is not one.  ``arguments`` is the model's own
    text of the object (what was streamed), not a re-serialisation."""
    head = _call_head(line)
    body = line.rstrip()
    if head is None or not body.endswith("}"):
        return None
    name, start = head
    arguments = body[start:-1].rstrip()
    try:
        whole, parsed = json.loads(body), json.loads(arguments)
    except json.JSONDecodeError:
        return None
    if not (isinstance(whole, dict) and set(whole) == {"name", "arguments"}
            and isinstance(parsed, dict)):
        return None
    return ToolCall(name=name, arguments=arguments)


def parse_calls(text: str) -> tuple[ToolCall, ...] | None:
    """The calls in an answer written in the call format, or None when it is not one."""
    calls = []
    for line in text.strip().split("\n"):
        if not line.strip():
            continue
        call = parse_call_line(line)
        if call is None:
            return None
        calls.append(call)
    return tuple(calls) or None


class JsonToolCalls:
    """A :class:`~adapters.family.StreamPostprocessor` for answers that may be calls.

    An answer whose first non-blank character is ``{`` is calls: each line's name is reported as
    soon as it is complete and its arguments as they arrive (:meth:`take_parts`; a trailing
    ``}`` is held until the line shows whether it closes the call), and the whole answer is
    parsed at the end (``tool_calls``).  Any other answer streams through the family's own
    post-processing.
    """

    def __init__(self, inner: StreamPostprocessor) -> None:
        self._inner = inner
        self._held = ""
        self._mode: str | None = None  # "call" or "text", decided by the first non-blank char
        self.tool_calls: tuple[ToolCall, ...] = ()
        self._parts: list[ToolCallPart] = []
        self._line = 0  # index of the call line being read
        self._sent = 0  # characters of that line's arguments reported so far
        self._named = False

    def feed(self, text: str) -> str:
        if self._mode == "text":
            return self._inner.feed(text)
        self._held += text
        if self._mode is None and self._held.strip():
            self._mode = "call" if self._held.lstrip().startswith("{") else "text"
            if self._mode == "text":
                held, self._held = self._held, ""
                return self._inner.feed(held)
        if self._mode == "call":
            self._stream_parts()
        return ""

    def take_parts(self) -> tuple[ToolCallPart, ...]:
        parts, self._parts = tuple(self._parts), []
        return parts

    def _stream_parts(self) -> None:
        lines = self._held.lstrip().split("\n")
        while self._line < len(lines):
            line, complete = lines[self._line], self._line < len(lines) - 1
            head = _call_head(line)
            if head is None:
                return
            name, start = head
            if not self._named:
                self._parts.append(ToolCallPart(index=self._line, name=name))
                self._named = True
            body = line.rstrip() if complete else line
            # the last "}" (and whitespace) may close the call rather than the arguments
            end = len(body) - 1 if complete else len(body.rstrip().rstrip("}"))
            if end > start + self._sent:
                self._parts.append(ToolCallPart(index=self._line,
                                                arguments=body[start + self._sent:end]))
                self._sent = end - start
            if not complete:
                return
            self._line, self._sent, self._named = self._line + 1, 0, False

    def finish(self) -> str:
        if self._mode == "call":
            calls = parse_calls(self._held)
            if calls is not None:
                self._held += "\n"  # the last line is complete: report what it still held
                self._stream_parts()
                self.tool_calls = calls
                return ""
            # Not calls after all (cut by max_tokens, or made without a grammar): the text is
            # the answer.
            return self._inner.feed(self._held) + self._inner.finish()
        if self._held:
            return self._inner.feed(self._held) + self._inner.finish()
        return self._inner.finish()


def with_tool_calls(
    new_postprocessor: Callable[[bool], StreamPostprocessor],
) -> Callable[[bool], StreamPostprocessor]:
    """A family's post-processor factory that also reads calls when tools were offered."""

    def new(tools: bool = False) -> StreamPostprocessor:
        inner = new_postprocessor(False)
        return JsonToolCalls(inner) if tools else inner

    return new
