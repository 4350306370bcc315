"""ChatGLM3's tool (function) calling, in its own text format, mapped to OpenAI's.

The formats, as THUDM's chatglm3-6b code and demos use them:

* tools are offered in a system message: ``TOOLS_PROMPT`` + ``"\\n"`` + ``json.dumps(tools,
  indent=4, ensure_ascii=False)`` (tokenization_chatglm.py ``build_single_message``; the prompt
  text is the one of THUDM's ``openai_api_demo``);
* the model calls a tool as an assistant message whose metadata line is the tool name and whose
  content is ``"```python\\ntool_call(key=value, ...)\\n```"``;
* the tool's result comes back in an ``<|observation|>`` message.

The reference ``process_response`` turns a call into arguments with ``eval``; here the call is
parsed with :mod:`ast` and only literal values are accepted, so nothing the model writes runs.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence

from adapters.base import Tool, ToolCall

TOOLS_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)


def tools_system_content(tools: Sequence[Tool]) -> str:
    listed = []
    for tool in tools:
        entry: dict[str, object] = {"name": tool.name}
        if tool.description:
            entry["description"] = tool.description
        if tool.parameters:
            entry["parameters"] = tool.parameters
        listed.append(entry)
    return TOOLS_PROMPT + "\n" + json.dumps(listed, indent=4, ensure_ascii=False)


def call_text(call: ToolCall) -> str:
    """An earlier call as the model writes it: ``tool_call(city='北京')`` in a python block."""
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {call.name!r}: arguments must be a JSON object")
    rendered = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"```python\ntool_call({rendered})\n```"


def parse_call(name: str, content: str) -> ToolCall | None:
    """The call in ``content`` (after the tool-name line), or None when it is not one.

    Like the reference, the first and last lines (the code fence) are dropped first.
    """
    body = "\n".join(content.strip().split("\n")[1:-1]).strip()
    try:
        node = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "tool_call" and not node.args):
        return None
    arguments = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            return None
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, SyntaxError):
            return None
    try:
        text = json.dumps(arguments, ensure_ascii=False)
    except (TypeError, ValueError):  # e.g. a set or bytes literal: not JSON
        return None
    return ToolCall(name=name.strip(), arguments=text)
