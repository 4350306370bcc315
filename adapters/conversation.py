"""What THUDM's official ``chat()`` takes, and the mapping shared by the families that take a
``(query, history)`` pair.  Pure strings, no tokens.  Each family picks its mapping in its
:class:`~adapters.family.FamilySpec` (``to_conversation``).

A pair family has no system role.  Our policy (``SystemPolicy``), documented in the README:

* ``prepend`` (default): every system/developer message, in order, joined with ``"\\n"``, is put
  before the text of the *first* user turn, separated by ``"\\n"``.  Nothing is dropped silently.
* ``reject``: a system/developer message is a 400.

Consecutive messages of the same role are joined with ``"\\n"`` (clients such as LangChain
sometimes send two user messages in a row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from adapters.base import InvalidRequest, Message, Tool
from adapters.tool_convention import assistant_text, tool_result_text, tools_preamble

SystemPolicy = Literal["prepend", "reject"]
SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Turn:
    """A message of a family with native roles, as its prompt builder takes it."""

    role: str
    content: str
    metadata: str = ""


@dataclass(frozen=True)
class Conversation:
    """The official chat() arguments.  Pair families use ``query``/``history``; role families use
    ``turns`` (all messages before the last) and ``query``/``query_role`` (the last one)."""

    query: str
    history: tuple[tuple[str, str], ...] = ()
    turns: tuple[Turn, ...] = ()
    query_role: str = "user"


def to_pairs(
    messages: Sequence[Message], tools: Sequence[Tool] = (), policy: SystemPolicy = "prepend"
) -> Conversation:
    """Map messages to ``(query, history)``.  Offered ``tools``, earlier calls and tool results
    follow :mod:`adapters.tool_convention` (a tool result is a user turn)."""
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    system_parts: list[str] = []
    merged: list[tuple[str, str]] = []  # (role, text) with same-role runs joined
    call_names = {call.id: call.name for m in messages for call in m.tool_calls if call.id}
    for i, m in enumerate(messages):
        if m.role in SYSTEM_ROLES:
            if policy == "reject":
                raise InvalidRequest(
                    "This model has no system role and the server is configured to reject "
                    f"{m.role} messages.",
                    param=f"messages.[{i}].role",
                )
            system_parts.append(m.content)
            continue
        if m.role not in ("user", "assistant", "tool"):
            raise InvalidRequest(
                f"Role '{m.role}' is not supported by this model; use 'system', 'user', "
                "'assistant' or 'tool'.",
                param=f"messages.[{i}].role",
            )
        role, text = m.role, m.content
        if role == "tool":
            previous = messages[i - 1] if i else None
            if previous is None or not (previous.tool_calls or previous.role == "tool"):
                raise InvalidRequest(
                    "A 'tool' message must follow an assistant message with 'tool_calls'.",
                    param=f"messages.[{i}].role")
            role, text = "user", tool_result_text(m, call_names)
        elif m.tool_calls:
            try:
                text = assistant_text(m)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param=f"messages.[{i}].tool_calls") from exc
        if merged and merged[-1][0] == role:
            merged[-1] = (role, merged[-1][1] + "\n" + text)
        else:
            merged.append((role, text))
    if not merged or merged[-1][0] != "user":
        raise InvalidRequest(
            "The last message must be a user or tool message for this model.", param="messages"
        )
    if merged[0][0] != "user":
        raise InvalidRequest(
            "The conversation must start with a user message (after any system messages).",
            param="messages",
        )
    preamble = ([tools_preamble(tools)] if tools else []) + system_parts
    if preamble:
        first = merged[0]
        merged[0] = (first[0], "\n".join(preamble) + "\n" + first[1])
    history = tuple(
        (merged[j][1], merged[j + 1][1]) for j in range(0, len(merged) - 1, 2)
    )
    return Conversation(query=merged[-1][1], history=history)
