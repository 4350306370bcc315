"""Adapter Deltas -> OpenAI chat-completion chunks, or one aggregated ChatCompletion.

The chunks are a straight line, per OpenAI's format (``gateway/sse.py`` sends them, then
``data: [DONE]``):

1. per choice, a chunk with ``delta: {"role": "assistant", "content": ""}``;
2. content chunks (a Delta with no text and no logprobs is skipped), or a tool-call chunk;
3. per choice, a chunk with an empty delta and ``finish_reason``;
4. with ``stream_options.include_usage``: a chunk with ``choices: []`` and ``usage``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from adapters.base import Delta, FinishReason, TokenLogprob, ToolCallPart
from gateway import protocol as p
from gateway.generation import CompletionMeta, Deltas, UsageSum, finish_reason


async def chunks(deltas: Deltas, meta: CompletionMeta, n: int,
                 include_usage: bool) -> AsyncIterator[p.ChatCompletionChunk]:
    """The chunks of ``n`` choices, in order; ``deltas`` is ``(choice index, Delta)``."""
    usage = UsageSum()
    #: choices whose calls came as parts while generated (their finished calls are not resent)
    streamed: set[int] = set()
    for index in range(n):
        yield _chunk(meta, p.ChunkChoice(index=index, delta=p.ChoiceDelta(
            role="assistant", content="")))
    async for index, delta in deltas:
        if delta.text or delta.logprobs:
            yield _chunk(meta, p.ChunkChoice(
                index=index,
                delta=p.ChoiceDelta(content=delta.text),
                logprobs=p.ChoiceLogprobs(content=list(delta.logprobs))
                if delta.logprobs else None,
            ))
        for part in delta.tool_call_parts:
            streamed.add(index)
            yield _chunk(meta, p.ChunkChoice(index=index, delta=p.ChoiceDelta(
                tool_calls=[_part_piece(part)])))
        if index not in streamed:
            for i, call in enumerate(_tool_calls(delta)):
                for piece in _call_pieces(i, call):
                    yield _chunk(meta, p.ChunkChoice(index=index,
                                                     delta=p.ChoiceDelta(tool_calls=[piece])))
        if delta.finish_reason is not None:
            usage.add(index, delta.usage)
            yield _chunk(meta, p.ChunkChoice(
                index=index, delta=p.ChoiceDelta(),
                finish_reason=finish_reason(delta.finish_reason),
            ))
    if include_usage:
        yield p.ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=[],
            usage=usage.wire(), system_fingerprint=meta.system_fingerprint,
        )


async def collect(deltas: Deltas, meta: CompletionMeta, n: int,
                  logprobs_asked: bool = False) -> p.ChatCompletion:
    """Aggregate every choice into one non-streamed ChatCompletion."""
    texts = [""] * n
    calls: list[list[p.ResponseToolCall]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish: list[FinishReason] = ["stop"] * n
    usage = UsageSum()
    # asked: every choice has a list, [] for an empty answer (as OpenAI answers it)
    wants_logprobs = logprobs_asked
    async for index, delta in deltas:
        texts[index] += delta.text
        calls[index].extend(_tool_calls(delta))
        if delta.logprobs:
            wants_logprobs = True
            logprobs[index].extend(delta.logprobs)
        if delta.finish_reason is not None:
            finish[index] = finish_reason(delta.finish_reason)
            usage.add(index, delta.usage)
    return p.ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            p.Choice(
                index=i,
                message=p.AssistantMessage(
                    # OpenAI: content is null on a message that only calls tools
                    content=texts[i] if texts[i] or not calls[i] else None,
                    tool_calls=calls[i] or None,
                ),
                logprobs=p.ChoiceLogprobs(content=logprobs[i]) if wants_logprobs else None,
                finish_reason=finish[i],
            )
            for i in range(n)
        ],
        usage=usage.wire(),
        system_fingerprint=meta.system_fingerprint,
    )


def _tool_calls(delta: Delta) -> list[p.ResponseToolCall]:
    return [
        p.ResponseToolCall(id=call.id or p.tool_call_id(),
                           function=p.ResponseFunction(name=call.name, arguments=call.arguments))
        for call in delta.tool_calls
    ]


#: Characters of a finished call's arguments per chunk after the first, for families whose
#: calls are only known whole (OpenAI streams arguments in pieces).
ARGUMENT_PIECE = 32


def _part_piece(part: ToolCallPart) -> p.ChunkToolCall:
    """A call's part as generated: its first (the name) opens the call with a new id."""
    if part.name:
        return p.ChunkToolCall(index=part.index, id=p.tool_call_id(), type="function",
                               function=p.ChunkFunction(name=part.name, arguments=part.arguments))
    return p.ChunkToolCall(index=part.index, function=p.ChunkFunction(arguments=part.arguments))


def _call_pieces(index: int, call: p.ResponseToolCall) -> list[p.ChunkToolCall]:
    """A tool call as OpenAI streams one: id, type and name first, then the arguments."""
    first = p.ChunkToolCall(index=index, id=call.id, type="function",
                            function=p.ChunkFunction(name=call.function.name, arguments=""))
    text = call.function.arguments
    return [first] + [
        p.ChunkToolCall(index=index, function=p.ChunkFunction(arguments=text[i:i + ARGUMENT_PIECE]))
        for i in range(0, len(text), ARGUMENT_PIECE)
    ]


def _chunk(meta: CompletionMeta, choice: p.ChunkChoice) -> p.ChatCompletionChunk:
    return p.ChatCompletionChunk(
        id=meta.id, created=meta.created, model=meta.model, choices=[choice],
        system_fingerprint=meta.system_fingerprint,
    )
