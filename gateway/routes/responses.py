"""POST /v1/responses: OpenAI's Responses API, stateless, on the chat path
(``gateway/responses_protocol.py`` says how a request maps onto a chat request)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from adapters.base import ChatRequest
from gateway import responses_stream, sse
from gateway.generation import accept, admit, prepare, respond, start
from gateway.responses_protocol import ResponsesRequest, response_id
from gateway.responses_stream import ResponsePlan

router = APIRouter(dependencies=[Depends(admit)])


@router.post("/v1/responses", response_model=None)
async def create_response(request: Request) -> Response:
    body, served, meta = await accept(request, ResponsesRequest, response_id)
    prompt = await prepare(served, ChatRequest(
        messages=body.to_messages(), params=body.to_sampling_params(served.defaults),
        tools=body.to_tools(), tool_choice=body.to_tool_choice(), grammar=body.to_grammar()))
    plan = ResponsePlan(meta=meta, request=body, temperature=prompt.params.temperature,
                        top_p=prompt.params.top_p)
    stream = await start(request, served, [prompt], body)
    return await respond(
        request, stream, meta.id, streaming=bool(body.stream), wire=sse.RESPONSES,
        chunks=lambda deltas: responses_stream.events(deltas, plan),
        collect=lambda deltas: responses_stream.collect(deltas, plan),
    )
