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

A forced call (``tool_choice`` ``"required"`` or a named function) is held to this format by
:func:`call_grammar`: the tool-name line, then ``tool_call(key=value, ...)`` whose values are
JSON following the function's ``parameters`` schema.  JSON values are Python literals but for
``true``/``false``/``null``, which :func:`parse_call` therefore reads too.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence

from adapters.base import GrammarSpec, Tool, ToolCall, ToolChoice
from adapters.runtime.grammar import lark_json
from adapters.tool_convention import call_arguments, tool_entries

#: JSON's literals as Python's (a grammar-forced call writes JSON values).
_JSON_NAMES = {"true": True, "false": False, "null": None}

TOOLS_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)


def tools_system_content(tools: Sequence[Tool]) -> str:
    return TOOLS_PROMPT + "\n" + json.dumps(tool_entries(tools), indent=4, ensure_ascii=False)


def call_text(call: ToolCall) -> str:
    """An earlier call as the model writes it: ``tool_call(city='北京')`` in a python block."""
    rendered = ", ".join(f"{key}={value!r}" for key, value in call_arguments(call).items())
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
            arguments[keyword.arg] = ast.literal_eval(_python_literals(keyword.value))
        except (ValueError, SyntaxError):
            return None
    try:
        text = json.dumps(arguments, ensure_ascii=False)
    except (TypeError, ValueError):  # e.g. a set or bytes literal: not JSON
        return None
    return ToolCall(name=name.strip(), arguments=text)


class _JsonNames(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_NAMES:
            return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node)
        return node


def _python_literals(node: ast.expr) -> ast.expr:
    """``node`` with JSON's ``true``/``false``/``null`` as Python constants."""
    return _JsonNames().visit(node)  # type: ignore[no-any-return]


def call_grammar(tools: Sequence[Tool], choice: ToolChoice) -> GrammarSpec | None:
    """The grammar of a forced call (None for ``"auto"``: the model answers freely in its own
    format).  Parallel calls do not exist in ChatGLM3's format: one call per answer."""
    if not tools or not choice.forced:
        return None
    callable_ = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    rules = [f"start: {' | '.join(f'call{i}' for i in range(len(callable_)))}"]
    for i, tool in enumerate(callable_):
        rules.append(f"call{i}: {json.dumps(tool.name, ensure_ascii=False)} "
                     f'"\\n```python\\ntool_call(" args{i} ")\\n```"')
        rules += _kwargs_rules(f"args{i}", tool.parameters, tool.strict)
    return GrammarSpec(kind="lark", value="\n".join(rules) + "\n",
                       strict=all(t.strict for t in callable_))


def _kwargs_rules(name: str, schema: dict[str, object], strict: bool) -> list[str]:
    """Lark rules for ``key=value, ...`` following an object schema: its properties in order,
    the required ones always, each value JSON under the property's schema.  A schema without
    properties takes any keyword arguments."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict) or not properties:
        return [f'{name}: ({name}_kw (", " {name}_kw)*)?',
                f'{name}_kw: /[A-Za-z_][A-Za-z0-9_]*/ "=" {lark_json({}, strict=strict)}']
    listed = schema.get("required")
    required = {str(k) for k in listed} if isinstance(listed, list) else set()
    keys = list(properties)
    rules = []
    # first_i: arguments from key i on, none written yet; rest_i: some written already (so each
    # comes with its ", "); optional keys may be skipped, required ones may not.
    for i, key in enumerate(keys):
        value = properties[key] if isinstance(properties[key], dict) else {}
        rules.append(f'{name}_v{i}: {json.dumps(key + "=")} {lark_json(value, strict=strict)}')
        skip_first = f" | {name}_first{i + 1}" if key not in required else ""
        skip_rest = f" | {name}_rest{i + 1}" if key not in required else ""
        rules.append(f"{name}_first{i}: {name}_v{i} {name}_rest{i + 1}{skip_first}")
        rules.append(f'{name}_rest{i}: ", " {name}_v{i} {name}_rest{i + 1}{skip_rest}')
    n = len(keys)
    rules.append(f'{name}_first{n}: ""')
    rules.append(f'{name}_rest{n}: ""')
    rules.append(f"{name}: {name}_first0")
    return rules
