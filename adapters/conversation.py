"""OpenAI message lists -> what ChatGLM's official ``chat()`` takes.  Pure strings, no tokens.

ChatGLM-6B and ChatGLM2-6B take ``(query, history)`` with history as ``[(question, answer), ...]``
and have no system role.  Our policy (``SystemPolicy``), documented in the README:

* ``prepend`` (default): every system/developer message, in order, joined with ``"\\n"``, is put
  before the text of the *first* user turn, separated by ``"\\n"``.  Nothing is dropped silently.
* ``reject``: a system/developer message is a 400.

ChatGLM3-6B has native roles: system (and developer) -> ``system``, ``tool`` -> ``observation``.
Consecutive messages of the same role are joined with ``"\\n"`` for the pair families (clients
such as LangChain sometimes send two user messages in a row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from adapters.base import InvalidRequest, Message, Tool

SystemPolicy = Literal["prepend", "reject"]
SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Turn:
    """A ChatGLM3 message: role in {system, user, assistant, observation}."""

    role: str
    content: str
    metadata: str = ""


@dataclass(frozen=True)
class Conversation:
    """The official chat() arguments.  Pair families use ``query``/``history``; v3 uses ``turns``
    (all messages before the last) and ``query``/``query_role`` (the last one)."""

    query: str
    history: tuple[tuple[str, str], ...] = ()
    turns: tuple[Turn, ...] = ()
    query_role: str = "user"


def to_pairs(messages: Sequence[Message], policy: SystemPolicy = "prepend") -> Conversation:
    """Map messages to ``(query, history)`` for ChatGLM-6B / ChatGLM2-6B."""
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    system_parts: list[str] = []
    merged: list[tuple[str, str]] = []  # (role, text) with same-role runs joined
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
        if m.role not in ("user", "assistant"):
            raise InvalidRequest(
                f"Role '{m.role}' is not supported by this model; use 'system', 'user' or "
                "'assistant'.",
                param=f"messages.[{i}].role",
            )
        if merged and merged[-1][0] == m.role:
            merged[-1] = (m.role, merged[-1][1] + "\n" + m.content)
        else:
            merged.append((m.role, m.content))
    if not merged or merged[-1][0] != "user":
        raise InvalidRequest(
            "The last message must be a user message for this model.", param="messages"
        )
    if merged[0][0] != "user":
        raise InvalidRequest(
            "The conversation must start with a user message (after any system messages).",
            param="messages",
        )
    if system_parts:
        first = merged[0]
        merged[0] = (first[0], "\n".join(system_parts) + "\n" + first[1])
    history = tuple(
        (merged[j][1], merged[j + 1][1]) for j in range(0, len(merged) - 1, 2)
    )
    return Conversation(query=merged[-1][1], history=history)


_V3_ROLES = {"system": "system", "developer": "system", "user": "user",
             "assistant": "assistant", "tool": "observation", "observation": "observation"}


def to_turns(messages: Sequence[Message], tools: Sequence[Tool] = ()) -> Conversation:
    """Map messages to ChatGLM3's role list; the last message becomes the query.

    Offered ``tools`` become a first system message in ChatGLM3's tool format; an assistant
    message's ``tool_calls`` become assistant turns whose metadata is the tool name (THUDM's
    openai_api_demo ``process_messages`` does the same).
    """
    from adapters.chatglm2.tools import call_text, tools_system_content

    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    turns: list[Turn] = []
    if tools:
        turns.append(Turn(role="system", content=tools_system_content(tools)))
    for i, m in enumerate(messages):
        role = _V3_ROLES.get(m.role)
        if role is None:
            raise InvalidRequest(f"Role '{m.role}' is not supported.", param=f"messages.[{i}].role")
        if m.tool_calls:
            if m.content:
                turns.append(Turn(role=role, content=m.content))
            for j, call in enumerate(m.tool_calls):
                try:
                    turns.append(Turn(role=role, content=call_text(call), metadata=call.name))
                except ValueError as exc:
                    raise InvalidRequest(
                        str(exc), param=f"messages.[{i}].tool_calls.[{j}].function.arguments"
                    ) from exc
            continue
        turns.append(Turn(role=role, content=m.content))
    last = turns[-1]
    if last.role not in ("user", "observation") or last.metadata:
        raise InvalidRequest(
            "The last message must be a user or tool message.", param="messages"
        )
    return Conversation(query=last.content, turns=tuple(turns[:-1]), query_role=last.role)
