"""POST /v1/completions: OpenAI's legacy completions on a chat model.

ChatGLM is a chat model: each prompt is fed as ONE user turn through the model's chat prompt
format (``model.prepare([Message("user", prompt)])``), not as raw text to continue.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from adapters.base import ChatRequest, Message
from gateway import completion_stream
from gateway.completion_stream import CompletionPlan
from gateway.generation import accept, admit, prepare_all, respond, start
from gateway.protocol import CompletionRequest, legacy_completion_id

router = APIRouter(dependencies=[Depends(admit)])


@router.post("/v1/completions", response_model=None)
async def create_completion(request: Request) -> Response:
    body, served, meta = await accept(request, CompletionRequest, legacy_completion_id)
    params = body.to_sampling_params(served.defaults)
    # Every prompt is prepared before anything starts: one bad prompt is a 400 for the request.
    grammar = body.to_grammar()
    generations = len(body.prompts) * body.choices
    prompts = await prepare_all(served, [
        ChatRequest((Message(role="user", content=text),), params, grammar=grammar,
                    generations=generations) for text in body.prompts])
    n = body.choices
    plan = CompletionPlan(
        meta=meta,
        echoes=tuple(text if body.echo else "" for text in body.prompts for _ in range(n)),
        n=n,
        logprobs=body.logprobs is not None,
        prompt_logprobs=params.prompt_logprobs,
    )
    stream = await start(request, served, [job for prompt in prompts for job in prompt.choices(n)],
                         body)
    return await respond(
        request, stream, meta.id, streaming=bool(body.stream),
        chunks=lambda deltas: completion_stream.chunks(deltas, plan, body.include_usage),
        collect=lambda deltas: completion_stream.collect(deltas, plan),
    )
