"""POST /v1/completions: OpenAI's legacy completions on a chat model.

ChatGLM is a chat model: each prompt is fed as ONE user turn through the model's chat prompt
format (``model.prepare([Message("user", prompt)])``), not as raw text to continue.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from adapters.base import ChatRequest, Message
from gateway import completions
from gateway.generation import (
    CLIENT_CLOSED,
    admit,
    fingerprint,
    resolve_model,
    start,
    unless_disconnected,
)
from gateway.protocol import CompletionRequest, legacy_completion_id, now, validated
from gateway.settings import ServerSettings
from gateway.streaming import CompletionMeta, event_response

logger = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(admit)])


@router.post("/v1/completions", response_model=None)
async def create_completion(request: Request) -> Response:
    body = validated(CompletionRequest, await request.body())
    settings: ServerSettings = request.app.state.settings
    served = resolve_model(request, body.model)
    model = served.model
    params = body.to_sampling_params(served.defaults)
    # Every prompt is prepared before anything starts: one bad prompt is a 400 for the request.
    prompts = [model.prepare(ChatRequest((Message(role="user", content=text),), params))
               for text in body.prompts]

    n = body.choices
    jobs = [choice for prompt in prompts for choice in prompt.choices(n)]
    plan = completions.CompletionPlan(
        meta=CompletionMeta(id=legacy_completion_id(), created=now(), model=model.info.id,
                            system_fingerprint=fingerprint(model.info)),
        echoes=tuple(text if body.echo else "" for text in body.prompts for _ in range(n)),
        prompt_tokens=sum(len(prompt.token_ids) for prompt in prompts),
        logprobs=body.logprobs is not None,
    )
    stream = await start(request, served, jobs)
    if body.stream:
        events = completions.sse_events(stream, plan, include_usage=body.include_usage,
                                        ping_seconds=settings.sse_ping_seconds)
        return event_response(events, stream, settings.shutdown_grace)
    try:
        completion = await unless_disconnected(request, completions.collect(stream, plan))
    finally:
        await stream.aclose()
    if completion is None:
        logger.info("client left before %s finished; generation cancelled", plan.meta.id)
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(completion.model_dump(mode="json"))
