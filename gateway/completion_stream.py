"""Adapter Deltas -> OpenAI legacy ``text_completion`` objects, streamed or aggregated.

Choice ``i * n + j`` is the ``j``-th sample of prompt ``i`` (OpenAI's numbering for a list of
prompts).  The chunks are, per choice, the echoed prompt first (with ``echo``), then text chunks,
then a chunk with empty text and ``finish_reason``; with ``stream_options.include_usage`` a chunk
with ``choices: []`` and ``usage`` (``gateway/sse.py`` sends them, then ``data: [DONE]``).  No
role chunk: legacy completions have none.

``logprobs`` uses the legacy shape: parallel lists ``tokens``, ``token_logprobs``,
``top_logprobs`` (per token a ``{token: logprob}`` dict of the top alternatives plus the chosen
token, so up to ``logprobs + 1`` entries, as OpenAI documents) and ``text_offset`` (where each
token starts in the choice's text, echoed prompt included).  With ``echo`` the lists start with
the prompt's tokens, the first with ``null`` logprob and top_logprobs; streamed, a choice's echo
chunk then waits for its prompt's logprobs (its first Delta) and carries them, as vLLM sends
them.  Offsets add up the token strings' lengths from the start of each part (prompt, answer),
as vLLM counts them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from adapters.base import FinishReason, PromptLogprobs, TokenLogprob
from gateway import protocol as p
from gateway.generation import CompletionMeta, Deltas, UsageSum, finish_reason


@dataclass(frozen=True)
class CompletionPlan:
    """What a legacy completion needs besides the deltas."""

    meta: CompletionMeta
    echoes: tuple[str, ...]  # per choice: the echoed prompt ("" without echo)
    n: int  # choices per prompt: choice i answers prompt i // n
    logprobs: bool
    #: the prompt is scored (``echo`` with ``logprobs``): its logprobs come with a first Delta
    prompt_logprobs: bool = False

    def usage(self) -> UsageSum:
        return UsageSum(lambda index: index // self.n)


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

    def convert_prompt(self, scored: PromptLogprobs | None) -> p.CompletionLogprobs:
        """The prompt's entries: its first token with null logprob, then the scored ones."""
        out = _empty_logprobs()
        if scored is not None:
            out.tokens.append(scored.first)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(self.offset)
            self.offset += len(scored.first)
            _extend(out, self.convert(scored.following))
        return out


def _empty_logprobs() -> p.CompletionLogprobs:
    return p.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])


def _extend(into: p.CompletionLogprobs, more: p.CompletionLogprobs) -> None:
    into.tokens.extend(more.tokens)
    into.token_logprobs.extend(more.token_logprobs)
    into.top_logprobs.extend(more.top_logprobs)
    into.text_offset.extend(more.text_offset)


async def collect(deltas: Deltas, plan: CompletionPlan) -> p.Completion:
    """Aggregate every choice into one non-streamed Completion."""
    n = len(plan.echoes)
    texts = list(plan.echoes)
    finish: list[FinishReason] = ["stop"] * n
    trackers = [_LegacyLogprobs(len(echo)) for echo in plan.echoes]
    logprobs = [_empty_logprobs() for _ in range(n)]
    usage = plan.usage()
    async for index, delta in deltas:
        texts[index] += delta.text
        if delta.prompt_logprobs is not None:
            _extend(logprobs[index], _LegacyLogprobs(0).convert_prompt(delta.prompt_logprobs))
        if delta.logprobs:
            _extend(logprobs[index], trackers[index].convert(delta.logprobs))
        if delta.finish_reason is not None:
            finish[index] = finish_reason(delta.finish_reason)
            usage.add(index, delta.usage)
    return p.Completion(
        id=plan.meta.id, created=plan.meta.created, model=plan.meta.model,
        choices=[
            p.CompletionChoice(text=texts[i], index=i, finish_reason=finish[i],
                               logprobs=logprobs[i] if plan.logprobs else None)
            for i in range(n)
        ],
        usage=usage.wire(),
        system_fingerprint=plan.meta.system_fingerprint,
    )


async def chunks(deltas: Deltas, plan: CompletionPlan,
                 include_usage: bool) -> AsyncIterator[p.Completion]:
    """The chunks of every choice, in order (see the module docstring); ``deltas`` is
    ``(choice index, Delta)``."""
    trackers = [_LegacyLogprobs(len(echo)) for echo in plan.echoes]
    usage = plan.usage()
    # An echo waits for its prompt's logprobs when they are asked, else it goes first.
    unechoed = set(range(len(plan.echoes))) if plan.prompt_logprobs else set()
    for index, echo in enumerate(plan.echoes):
        if echo and index not in unechoed:
            yield _chunk(plan, p.CompletionChoice(text=echo, index=index, finish_reason=None))
    async for index, delta in deltas:
        if index in unechoed:
            unechoed.discard(index)
            if plan.echoes[index] or delta.prompt_logprobs is not None:
                yield _chunk(plan, p.CompletionChoice(
                    text=plan.echoes[index], index=index, finish_reason=None,
                    logprobs=_LegacyLogprobs(0).convert_prompt(delta.prompt_logprobs)))
        if delta.text or delta.logprobs:
            yield _chunk(plan, p.CompletionChoice(
                text=delta.text, index=index, finish_reason=None,
                logprobs=trackers[index].convert(delta.logprobs) if plan.logprobs else None,
            ))
        if delta.finish_reason is not None:
            usage.add(index, delta.usage)
            yield _chunk(plan, p.CompletionChoice(
                text="", index=index, finish_reason=finish_reason(delta.finish_reason)))
    if include_usage:
        yield p.Completion(
            id=plan.meta.id, created=plan.meta.created, model=plan.meta.model, choices=[],
            usage=usage.wire(),
            system_fingerprint=plan.meta.system_fingerprint,
        )


def _chunk(plan: CompletionPlan, choice: p.CompletionChoice) -> p.Completion:
    return p.Completion(
        id=plan.meta.id, created=plan.meta.created, model=plan.meta.model, choices=[choice],
        system_fingerprint=plan.meta.system_fingerprint,
    )
