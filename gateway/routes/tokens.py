"""POST /tokenize and POST /detokenize (vLLM's paths and fields): count a prompt's tokens
before sending it, and show ids as text.  Chat messages are tokenized exactly as a chat
completion's prompt (``ChatModel.tokenize``); nothing is generated or queued."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request

from adapters.base import ChatRequest
from gateway.generation import admit, parse, resolve_model
from gateway.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(dependencies=[Depends(admit)])


@router.post("/tokenize", response_model=None)
async def tokenize(request: Request) -> TokenizeResponse:
    body = await parse(request, TokenizeRequest)
    model = resolve_model(request, body.model).model
    if body.chat_format:
        chat = ChatRequest(messages=body.to_messages(), tools=body.to_tools())
        ids = await anyio.to_thread.run_sync(model.tokenize, chat)
    else:
        ids = await anyio.to_thread.run_sync(model.encode, body.prompt or "")
    return TokenizeResponse(count=len(ids), max_model_len=model.info.context_length,
                            tokens=list(ids))


@router.post("/detokenize", response_model=None)
async def detokenize(request: Request) -> DetokenizeResponse:
    body = await parse(request, DetokenizeRequest)
    model = resolve_model(request, body.model).model
    return DetokenizeResponse(prompt=await anyio.to_thread.run_sync(model.decode, body.tokens))
