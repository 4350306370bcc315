"""OpenAI messages -> ChatGLM3's role list.  Pure strings, no tokens.

ChatGLM3-6B has native roles: system (and developer) -> ``system``, ``tool`` -> ``observation``;
offered tools and earlier tool calls use its tool format (:mod:`adapters.chatglm2.tools`).
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.base import InvalidRequest, Message, Tool
from adapters.chatglm2.tools import call_text, tools_system_content
from adapters.conversation import Conversation, SystemPolicy, Turn

_V3_ROLES = {"system": "system", "developer": "system", "user": "user",
             "assistant": "assistant", "tool": "observation", "observation": "observation"}


def to_turns(
    messages: Sequence[Message], tools: Sequence[Tool] = (), policy: SystemPolicy = "prepend"
) -> Conversation:
    """Map messages to ChatGLM3's role list; the last message becomes the query.

    Offered ``tools`` become a first system message in ChatGLM3's tool format; an assistant
    message's ``tool_calls`` become assistant turns whose metadata is the tool name (THUDM's
    openai_api_demo ``process_messages`` does the same).  ``policy`` is unused: ChatGLM3 has a
    system role.
    """
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
