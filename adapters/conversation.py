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
    """Map messages to ``(query, history)``.  ``tools`` is unused: a pair family has no tool
    format."""
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
