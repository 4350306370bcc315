"""ChatGLM's original API, ``POST /``, as THUDM's ``api.py`` answers it.

Body ``{prompt, history, max_length, top_p, temperature}`` (plus ``model``, our extension; else
the first configured model) -> ``{response, history, status: 200, time}``.  Faithful details:

* ``max_length`` is the TOTAL length, prompt included (THUDM ``model.chat`` passes it to
  ``generate``), so the completion may have ``max_length - prompt tokens`` tokens (400 when that
  is not positive).
* Defaults as api.py: ``max_length if max_length else 2048``, ``top_p if top_p else 0.7``,
  ``temperature if temperature else 0.95`` -- a value of 0 or null takes the default too.
* ``history`` is ``[[query, response], ...]`` (ChatGLM-6B/2); the answer appends the new pair.
  ChatGLM3's ``chat()`` keeps ``[{"role", "content"}, ...]`` instead: such a history is accepted
  and extended the same way (a user and an assistant message, as ChatGLM3's ``chat()`` does).
* ``time`` is the server's local time as ``%Y-%m-%d %H:%M:%S``.

Errors keep OpenAI's error shape and status (api.py itself only ever failed with a 500).
"""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from adapters.base import ChatRequest, Message
from gateway.generation import (
    Deltas,
    admit,
    finish_reason,
    parse,
    prepare,
    resolve_model,
    respond,
    start,
)
from gateway.protocol import ChatGLMRequest, ChatGLMResponse, LegacyMessage

router = APIRouter(dependencies=[Depends(admit)])

# THUDM api.py's default.
MAX_LENGTH = 2048


@router.post("/", response_model=None)
async def chatglm_chat(request: Request) -> Response:
    body = await parse(request, ChatGLMRequest)
    served = resolve_model(request, body.model)
    history = body.history or []
    prompt = await prepare(served, ChatRequest(
        messages=(*to_messages(history), Message("user", body.prompt)),
        params=body.to_sampling_params(served.defaults),
        max_length=body.max_length or MAX_LENGTH,
    ))
    stream = await start(request, served, [prompt])
    return await respond(request, stream, "the answer to POST /",
                         collect=lambda deltas: _reply(deltas, body, history))


def to_messages(history: list[list[str]] | list[LegacyMessage]) -> list[Message]:
    messages: list[Message] = []
    for item in history:
        if isinstance(item, LegacyMessage):
            messages.append(Message(item.role, item.content))
        else:
            query, response = item
            messages += [Message("user", query), Message("assistant", response)]
    return messages


def extended(history: list[list[str]] | list[LegacyMessage], query: str,
             response: str) -> list[Any]:
    if history and isinstance(history[0], LegacyMessage):
        # ChatGLM3 modeling_chatglm.py chat(): the user turn, then the answer with its metadata.
        return [*(m.model_dump() for m in history if isinstance(m, LegacyMessage)),
                {"role": "user", "content": query},
                {"role": "assistant", "metadata": "", "content": response}]
    return [*history, [query, response]]


async def _reply(deltas: Deltas, body: ChatGLMRequest,
                 history: list[list[str]] | list[LegacyMessage]) -> ChatGLMResponse:
    answer = ""
    async for _, delta in deltas:
        answer += delta.text
        if delta.finish_reason is not None:
            finish_reason(delta.finish_reason)  # a failed generation raises its error
    return ChatGLMResponse(
        response=answer,
        history=extended(history, body.prompt, answer),
        status=200,
        time=datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    )
