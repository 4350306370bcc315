"""Adapter Deltas -> OpenAI legacy ``text_completion`` objects, streamed or aggregated.

Choice ``i * n + j`` is the ``j``-th sample of prompt ``i`` (OpenAI's numbering for a list of
prompts).  A stream sends, per choice, the echoed prompt first (with ``echo``), then text chunks,
then a chunk with empty text and ``finish_reason``; with ``stream_options.include_usage`` a chunk
with ``choices: []`` and ``usage``; then ``data: [DONE]``.  No role chunk: legacy completions
have none.

``logprobs`` uses the legacy shape: parallel lists ``tokens``, ``token_logprobs``,
``top_logprobs`` (per token a ``{token: logprob}`` dict of the top alternatives plus the chosen
token, so up to ``logprobs + 1`` entries, as OpenAI documents) and ``text_offset`` (where each
token starts in the choice's text, echoed prompt included).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from sse_starlette import ServerSentEvent

from adapters.base import FinishReason, TokenLogprob, Usage
from gateway import protocol as p
from gateway.choices import ChoiceStream
from gateway.errors import from_exception
from gateway.streaming import DONE, CompletionMeta, finish_reason, json_event

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompletionPlan:
    """What a legacy completion needs besides the deltas."""

    meta: CompletionMeta
    echoes: tuple[str, ...]  # per choice: the echoed prompt ("" without echo)
    prompt_tokens: int  # summed over the distinct prompts, as OpenAI counts them
    logprobs: bool


class _LegacyLogprobs:
    """Accumulates one choice's legacy logprobs; offsets continue across chunks."""

    def __init__(self, start: int) -> None:
        self.offset = start

    def convert(self, entries: Sequence[TokenLogprob]) -> p.CompletionLogprobs:
        out = p.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for t in entries:
            out.tokens.append(t.token)
            out.token_logprobs.append(t.logprob)
            top = {a.token: a.logprob for a in t.top_logprobs}
            top.setdefault(t.token, t.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(t.token)
        return out


def _empty_logprobs() -> p.CompletionLogprobs:
    return p.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])


def _extend(into: p.CompletionLogprobs, more: p.CompletionLogprobs) -> None:
    into.tokens.extend(more.tokens)
    into.token_logprobs.extend(more.token_logprobs)
    into.top_logprobs.extend(more.top_logprobs)
    into.text_offset.extend(more.text_offset)


async def collect(stream: ChoiceStream, plan: CompletionPlan) -> p.Completion:
    """Aggregate every choice into one non-streamed Completion."""
    n = len(plan.echoes)
    texts = list(plan.echoes)
    finish: list[FinishReason] = ["stop"] * n
    trackers = [_LegacyLogprobs(len(echo)) for echo in plan.echoes]
    logprobs = [_empty_logprobs() for _ in range(n)]
    completion_tokens = 0
    async for index, delta in stream:
        texts[index] += delta.text
        if delta.logprobs:
            _extend(logprobs[index], trackers[index].convert(delta.logprobs))
        if delta.finish_reason is not None:
            finish[index] = finish_reason(delta.finish_reason)
            completion_tokens += delta.usage.completion_tokens if delta.usage else 0
    return p.Completion(
        id=plan.meta.id, created=plan.meta.created, model=plan.meta.model,
        choices=[
            p.CompletionChoice(text=texts[i], index=i, finish_reason=finish[i],
                               logprobs=logprobs[i] if plan.logprobs else None)
            for i in range(n)
        ],
        usage=_usage(plan, completion_tokens),
        system_fingerprint=plan.meta.system_fingerprint,
    )


async def sse_events(
    stream: ChoiceStream, plan: CompletionPlan, include_usage: bool, ping_seconds: float = 0.0,
) -> AsyncIterator[str | ServerSentEvent]:
    """The data of each SSE event, in order (see the module docstring)."""
    trackers = [_LegacyLogprobs(len(echo)) for echo in plan.echoes]
    completion_tokens = 0
    try:
        for index, echo in enumerate(plan.echoes):
            if echo:
                yield _chunk(plan, p.CompletionChoice(text=echo, index=index, finish_reason=None))
        async for item in stream.with_pings(ping_seconds):
            if item is None:
                yield ServerSentEvent(comment="ping", sep="\n")
                continue
            index, delta = item
            if delta.text or delta.logprobs:
                yield _chunk(plan, p.CompletionChoice(
                    text=delta.text, index=index, finish_reason=None,
                    logprobs=trackers[index].convert(delta.logprobs) if plan.logprobs else None,
                ))
            if delta.finish_reason is not None:
                completion_tokens += delta.usage.completion_tokens if delta.usage else 0
                yield _chunk(plan, p.CompletionChoice(
                    text="", index=index, finish_reason=finish_reason(delta.finish_reason)))
        if include_usage:
            yield p.Completion(
                id=plan.meta.id, created=plan.meta.created, model=plan.meta.model, choices=[],
                usage=_usage(plan, completion_tokens),
                system_fingerprint=plan.meta.system_fingerprint,
            ).model_dump_json()
        yield DONE
    except Exception as exc:  # the status is sent already: report in-band, then stop
        error = from_exception(exc)
        logger.warning("stream %s ended with an error: %s", plan.meta.id, error.message)
        yield json_event(error.body())
    finally:
        await stream.aclose()


def _usage(plan: CompletionPlan, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens)


def _chunk(plan: CompletionPlan, choice: p.CompletionChoice) -> str:
    return p.Completion(
        id=plan.meta.id, created=plan.meta.created, model=plan.meta.model, choices=[choice],
        system_fingerprint=plan.meta.system_fingerprint,
    ).model_dump_json()
