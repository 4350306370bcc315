"""POST /v1/chat/completions.

Every error that can be known before the first token (bad body, unknown model, a conversation
the model rejects, a full queue, even a failure at the first generation step) is raised before
the response starts, so it reaches the client as a real status code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable
from dataclasses import replace
from typing import TypeVar

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from adapters.base import ModelInfo, SamplingParams
from gateway.catalog import ModelCatalog
from gateway.choices import ChoiceStream
from gateway.errors import validated
from gateway.protocol import ChatCompletionRequest, completion_id, now
from gateway.settings import ServerSettings
from gateway.streaming import (
    CompletionMeta,
    collect,
    event_response,
    finish_reason,
    sse_events,
)

logger = logging.getLogger(__name__)
router = APIRouter()

T = TypeVar("T")

#: nginx's code for "client closed the request"; nobody reads it, it only shows in access logs.
CLIENT_CLOSED = 499


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: Request) -> Response:
    body = validated(ChatCompletionRequest, await request.body())
    catalog: ModelCatalog = request.app.state.catalog
    settings: ServerSettings = request.app.state.settings
    model = catalog.resolve(body.model).model
    params = body.to_sampling_params()
    prompt = model.prepare(body.to_messages(), params)

    n = body.choices
    meta = CompletionMeta(
        id=completion_id(), created=now(), model=model.info.id,
        system_fingerprint=fingerprint(model.info),
    )
    stream = ChoiceStream([model.generate(prompt, p) for p in choice_params(params, n)])
    try:
        await stream.prime()
        first = stream.peek()
        if first is not None and first[1].finish_reason is not None:
            finish_reason(first[1].finish_reason)  # a failed first step -> a status, not a stream
    except BaseException:
        await stream.aclose()
        raise
    if body.stream:
        events = sse_events(stream, meta, n, include_usage=body.include_usage,
                            ping_seconds=settings.sse_ping_seconds)
        return event_response(events, stream)
    try:
        completion = await unless_disconnected(request, collect(stream, meta, n))
    finally:
        await stream.aclose()
    if completion is None:
        logger.info("client left before %s finished; generation cancelled", meta.id)
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(completion.model_dump(mode="json"))


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One params per choice: with a seed, choice i samples with seed + i so that the choices
    differ yet the whole request stays reproducible."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [replace(params, seed=params.seed + i) for i in range(n)]


def fingerprint(info: ModelInfo) -> str:
    """Stable per served configuration, like OpenAI's ``system_fingerprint``."""
    digest = hashlib.sha256(f"{info.id}|{info.family}|{info.context_length}".encode())
    return "fp_" + digest.hexdigest()[:10]


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first (then cancel it and return None).

    Starlette keeps running a non-streaming handler after the client left; without this a
    dropped request would still generate up to max_tokens.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        return None
    finally:
        with anyio.CancelScope(shield=True):
            for pending in (task, watcher):
                pending.cancel()
            await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
