"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from adapters.base import ChatRequest
from gateway import chat_stream
from gateway.generation import accept, admit, prepare, respond, start
from gateway.protocol import ChatCompletionRequest, completion_id

router = APIRouter(dependencies=[Depends(admit)])


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: Request) -> Response:
    body, served, meta = await accept(request, ChatCompletionRequest, completion_id)
    prompt = await prepare(served, ChatRequest(
        messages=body.to_messages(), params=body.to_sampling_params(served.defaults),
        tools=body.to_tools(), tool_choice=body.to_tool_choice(), grammar=body.to_grammar(),
        generations=body.choices, prediction=body.to_prediction()))
    n = body.choices
    stream = await start(request, served, prompt.choices(n), body)
    return await respond(
        request, stream, meta.id, streaming=bool(body.stream),
        chunks=lambda deltas: chat_stream.chunks(deltas, meta, n, body.include_usage),
        collect=lambda deltas: chat_stream.collect(deltas, meta, n, bool(body.logprobs)),
    )
