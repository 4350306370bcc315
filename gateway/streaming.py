"""Adapter Deltas -> OpenAI chat-completion chunks over SSE, or one aggregated ChatCompletion.

The stream is a straight line, per OpenAI's format:

1. per choice, a chunk with ``delta: {"role": "assistant", "content": ""}``;
2. content chunks (a Delta with no text and no logprobs is skipped), or a tool-call chunk;
3. per choice, a chunk with an empty delta and ``finish_reason``;
4. with ``stream_options.include_usage``: a chunk with ``choices: []`` and ``usage``;
5. ``data: [DONE]``.

Events are ``data: <json>\\n\\n`` with LF line ends and no ``event:``/``id:`` fields.  Keep-alive
pings are SSE comments (``: ping``), which OpenAI's SDK skips.  An error once the stream has
started is sent as one ``data: {"error": {...}}`` event, and the stream ends without [DONE].
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from adapters.base import Delta, FinishReason, TokenLogprob, Usage
from gateway import protocol as p
from gateway.choices import ChoiceStream
from gateway.errors import InternalError, ServiceUnavailable, from_exception

logger = logging.getLogger(__name__)

DONE = "[DONE]"


@dataclass(frozen=True)
class CompletionMeta:
    """What every chunk (and the final object) of one completion repeats."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


def event_response(events: AsyncIterator[str | ServerSentEvent],
                   stream: ChoiceStream, shutdown_grace: float = 0.0) -> EventSourceResponse:
    """The SSE response; ``stream`` is closed after it in every case (even if the body never
    started because the client left at once).

    sse-starlette ends every stream as soon as uvicorn starts shutting down; with
    ``shutdown_grace`` the stream may first run to its end for that long (the drain).
    """
    return EventSourceResponse(
        events,
        sep="\n",
        ping=0,  # see the module docstring: sse_events sends the keep-alive comments
        shutdown_grace_period=shutdown_grace,
        background=BackgroundTask(stream.aclose),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def sse_events(
    stream: ChoiceStream, meta: CompletionMeta, n: int, include_usage: bool,
    ping_seconds: float = 0.0,
) -> AsyncIterator[str | ServerSentEvent]:
    """The data of each SSE event, in order (sse-starlette adds ``data: `` and the blank line),
    with a comment event after every ``ping_seconds`` without a Delta (0 = never)."""
    usage = _UsageSum()
    try:
        for index in range(n):
            yield _chunk(meta, p.ChunkChoice(index=index, delta=p.ChoiceDelta(
                role="assistant", content="")))
        async for item in stream.with_pings(ping_seconds):
            if item is None:
                yield ServerSentEvent(comment="ping", sep="\n")
                continue
            index, delta = item
            if delta.text or delta.logprobs:
                yield _chunk(meta, p.ChunkChoice(
                    index=index,
                    delta=p.ChoiceDelta(content=delta.text),
                    logprobs=_logprobs(delta.logprobs) if delta.logprobs else None,
                ))
            if delta.tool_calls:
                yield _chunk(meta, p.ChunkChoice(index=index, delta=p.ChoiceDelta(tool_calls=[
                    p.ChunkToolCall(index=i, **call.model_dump())
                    for i, call in enumerate(_tool_calls(delta))
                ])))
            if delta.finish_reason is not None:
                usage.add(delta.usage)
                yield _chunk(meta, p.ChunkChoice(
                    index=index, delta=p.ChoiceDelta(),
                    finish_reason=finish_reason(delta.finish_reason),
                ))
        if include_usage:
            yield p.ChatCompletionChunk(
                id=meta.id, created=meta.created, model=meta.model, choices=[],
                usage=usage.wire(), system_fingerprint=meta.system_fingerprint,
            ).model_dump_json()
        yield DONE
    except Exception as exc:  # the status is sent already: report in-band, then stop
        error = from_exception(exc)
        logger.warning("stream %s ended with an error: %s", meta.id, error.message)
        yield json_event(error.body())
    finally:
        await stream.aclose()


async def collect(stream: ChoiceStream, meta: CompletionMeta, n: int) -> p.ChatCompletion:
    """Aggregate every choice into one non-streamed ChatCompletion."""
    texts = [""] * n
    calls: list[list[p.ResponseToolCall]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish: list[FinishReason] = ["stop"] * n
    usage = _UsageSum()
    wants_logprobs = False
    async for index, delta in stream:
        texts[index] += delta.text
        calls[index].extend(_tool_calls(delta))
        if delta.logprobs:
            wants_logprobs = True
            logprobs[index].extend(delta.logprobs)
        if delta.finish_reason is not None:
            finish[index] = finish_reason(delta.finish_reason)
            usage.add(delta.usage)
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


# --------------------------------------------------------------------------- helpers


def finish_reason(reason: str) -> FinishReason:
    """Adapter finish reasons -> OpenAI's; a failed or cancelled generation raises the error
    the client gets."""
    if reason == "stop":
        return "stop"
    if reason == "length":
        return "length"
    if reason == "tool_calls":
        return "tool_calls"
    if reason == "cancelled":
        raise ServiceUnavailable(
            "The generation was cancelled by the server (it is shutting down or the model "
            "stopped).", code="generation_cancelled")
    raise InternalError()


class _UsageSum:
    """Prompt counted once (all choices share it, as OpenAI counts n>1), completions summed."""

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0

    def add(self, usage: Usage | None) -> None:
        if usage is None:
            return
        self.prompt = max(self.prompt, usage.prompt_tokens)
        self.completion += usage.completion_tokens

    def wire(self) -> Usage:
        return Usage(prompt_tokens=self.prompt, completion_tokens=self.completion)


def _tool_calls(delta: Delta) -> list[p.ResponseToolCall]:
    return [
        p.ResponseToolCall(id=call.id or p.tool_call_id(),
                           function=p.ResponseFunction(name=call.name, arguments=call.arguments))
        for call in delta.tool_calls
    ]


def _chunk(meta: CompletionMeta, choice: p.ChunkChoice) -> str:
    return p.ChatCompletionChunk(
        id=meta.id, created=meta.created, model=meta.model, choices=[choice],
        system_fingerprint=meta.system_fingerprint,
    ).model_dump_json()


def _logprobs(entries: tuple[TokenLogprob, ...]) -> p.ChoiceLogprobs:
    return p.ChoiceLogprobs(content=list(entries))


def json_event(body: dict[str, object]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))
