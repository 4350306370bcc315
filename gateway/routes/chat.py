"""POST /v1/chat/completions."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from adapters.base import ChatRequest
from gateway.generation import (
    CLIENT_CLOSED,
    admit,
    fingerprint,
    resolve_model,
    start,
    unless_disconnected,
)
from gateway.protocol import ChatCompletionRequest, completion_id, now, validated
from gateway.settings import ServerSettings
from gateway.streaming import CompletionMeta, collect, event_response, sse_events

logger = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(admit)])


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: Request) -> Response:
    body = validated(ChatCompletionRequest, await request.body())
    settings: ServerSettings = request.app.state.settings
    served = resolve_model(request, body.model)
    model = served.model
    prompt = model.prepare(ChatRequest(
        messages=body.to_messages(), params=body.to_sampling_params(served.defaults),
        tools=body.to_tools()))

    n = body.choices
    meta = CompletionMeta(
        id=completion_id(), created=now(), model=model.info.id,
        system_fingerprint=fingerprint(model.info),
    )
    stream = await start(request, served, prompt.choices(n))
    if body.stream:
        events = sse_events(stream, meta, n, include_usage=body.include_usage,
                            ping_seconds=settings.sse_ping_seconds)
        return event_response(events, stream, settings.shutdown_grace)
    try:
        completion = await unless_disconnected(request, collect(stream, meta, n))
    finally:
        await stream.aclose()
    if completion is None:
        logger.info("client left before %s finished; generation cancelled", meta.id)
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(completion.model_dump(mode="json"))
