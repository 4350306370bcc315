"""What every model route shares: resolve the model, start its generations, respond.

A route reads: ``accept`` (body + model) -> ``model.prepare`` -> ``start`` -> ``respond``.
Every error that can be known before the first token (an unknown model, a conversation the model
rejects, a full queue, even a failure at the first generation step) is raised before the response
starts, so it reaches the client as a real status code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import anyio
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from adapters.base import (
    ChatRequest,
    CompletionTokensDetails,
    Delta,
    FinishReason,
    ModelInfo,
    Outcome,
    Prompt,
    PromptTokensDetails,
    Usage,
)
from gateway import sse
from gateway.affinity import affinity
from gateway.catalog import ModelCatalog, ServedModel
from gateway.choices import ChoiceStream
from gateway.errors import CLIENT_CLOSED, InternalError, ServiceUnavailable
from gateway.lifecycle import Lifecycle
from gateway.metrics import GatewayMetrics
from gateway.protocol import SamplingRequest, now, validated
from gateway.settings import ServerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", bound=SamplingRequest)
M = TypeVar("M", bound=BaseModel)
#: What a route's chunk generator and collector read: ``(choice index, Delta)``.
Deltas = AsyncIterable[tuple[int, Delta]]



def admit(request: Request) -> None:
    """A router dependency of the model routes: 503 while the server drains."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    lifecycle.check_admission()


@dataclass(frozen=True)
class CompletionMeta:
    """What every chunk (and the final object) of one completion repeats."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


async def accept(request: Request, schema: type[R],
                 new_id: Callable[[], str]) -> tuple[R, ServedModel, CompletionMeta]:
    """The first steps of an OpenAI completion route: the validated body (else 400), the model
    it names (else 404) and the meta of the completion (``new_id()`` makes its id)."""
    body = await parse(request, schema)
    served = resolve_model(request, body.model)
    info = served.model.info
    return body, served, CompletionMeta(id=new_id(), created=now(), model=info.id,
                                        system_fingerprint=fingerprint(info))


async def parse(request: Request, schema: type[M]) -> M:
    """The request body validated against ``schema`` (else a 400), on a worker thread: a body
    of several MB takes a while to parse, and the event loop serves every other client."""
    raw = await request.body()
    return await anyio.to_thread.run_sync(validated, schema, raw)


async def prepare(served: ServedModel, request: ChatRequest) -> Prompt:
    """``model.prepare`` on a worker thread: tokenizing a long conversation (and compiling a
    grammar) must not hold up the event loop, which serves every other client."""
    return await anyio.to_thread.run_sync(served.model.prepare, request)


async def prepare_all(served: ServedModel, requests: Sequence[ChatRequest]) -> list[Prompt]:
    """Several prepares in one worker-thread call (a legacy completion's prompts); the first
    bad one is the request's 400."""
    return await anyio.to_thread.run_sync(lambda: [served.model.prepare(r) for r in requests])


def resolve_model(request: Request, name: str | None) -> ServedModel:
    """The served model named ``name`` (None: the first configured one); its id is recorded
    for the request metrics."""
    catalog: ModelCatalog = request.app.state.catalog
    served = catalog.first() if name is None else catalog.resolve(name)
    request.state.model = served.model.info.id
    return served


async def start(request: Request, served: ServedModel, prompts: Sequence[Prompt],
                body: SamplingRequest | None = None) -> ChoiceStream:
    """Start one generation per prompt (one per choice) and wait for the first Delta; a failure
    there raises (and closes everything) while a status can still be sent.  The prompts carry
    the request's routing key (``gateway/affinity.py``: its ``X-Session-Id`` header, else the
    ``body``'s ``prompt_cache_key`` or ``user``)."""
    metrics: GatewayMetrics = request.app.state.metrics
    model = served.model
    key = affinity(request.headers, body.prompt_cache_key if body else None,
                   body.user if body else None)
    if key:
        prompts = [replace(prompt, affinity=key) for prompt in prompts]
    started = time.monotonic()
    stream = ChoiceStream([
        metrics.measure(model.info.id, model.generate(prompt), started)
        for prompt in prompts
    ])
    try:
        await stream.prime()
        first = stream.peek()
        if first is not None and first[1].finish_reason is not None:
            finish_reason(first[1].finish_reason)  # a failed first step -> a status, not a stream
        if first is not None and first[1].replica:
            request.state.replica = first[1].replica  # the X-Replica header (with --ray)
    except BaseException:
        await stream.aclose()
        raise
    return stream


async def respond(
    request: Request, stream: ChoiceStream, name: str, *, streaming: bool = False,
    chunks: Callable[[Deltas], AsyncIterator[BaseModel]] | None = None,
    collect: Callable[[Deltas], Awaitable[BaseModel]], wire: sse.Wire = sse.CHUNKS,
) -> Response:
    """The response to started generations: ``streaming``, the SSE stream of
    ``chunks(stream)``; else ``collect(stream)`` as JSON, or a bare 499 when the client leaves
    first (the generations are cancelled).  ``stream`` is closed in every case; ``name`` (the
    completion id) names the response in logs; ``wire``: how the stream's events are written."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    if streaming:
        assert chunks is not None, "a streamed response needs its chunk generator"
        settings: ServerSettings = request.app.state.settings
        return placed(request, sse.response(
            chunks(stream), stream, name=name, ping_seconds=settings.sse_ping_seconds,
            shutdown_grace=settings.shutdown_grace, cut=lifecycle.must_cut, wire=wire))
    try:
        result = await unless_disconnected(request, collect(stream), lifecycle)
    finally:
        await stream.aclose()
    if isinstance(result, sse.Cut):
        logger.info("%s cut: the shutdown grace period ended", name)
        return sse.cut_error().response()
    if result is None:
        logger.info("client left before %s finished; generation cancelled", name)
        return Response(status_code=CLIENT_CLOSED)
    return placed(request, JSONResponse(result.model_dump(mode="json")))


def placed(request: Request, response: Response) -> Response:
    """``response`` with ``X-Replica: <replica id>`` when a Ray Serve replica ran the request."""
    replica = getattr(request.state, "replica", "")
    if replica:
        response.headers["X-Replica"] = replica
    return response


class UsageSum:
    """A request's usage over its generations, as OpenAI counts it: each distinct prompt once
    (the ``n`` choices of a prompt share it, with its cached tokens), completions summed.
    ``prompt_of(choice index)`` says which prompt a choice answers."""

    def __init__(self, prompt_of: Callable[[int], int] = lambda index: 0) -> None:
        self._prompt_of = prompt_of
        self._prompts: dict[int, tuple[int, int]] = {}  # prompt -> (tokens, cached)
        self._completion = 0
        self._details: CompletionTokensDetails | None = None  # summed, when any came

    def add(self, index: int, usage: Usage | None) -> None:
        if usage is None:
            return
        key = self._prompt_of(index)
        tokens, cached = self._prompts.get(key, (0, 0))
        self._prompts[key] = (max(tokens, usage.prompt_tokens),
                              max(cached, usage.prompt_tokens_details.cached_tokens))
        self._completion += usage.completion_tokens
        more = usage.completion_tokens_details
        if more is not None:
            have = self._details or CompletionTokensDetails()
            self._details = CompletionTokensDetails(
                accepted_prediction_tokens=have.accepted_prediction_tokens
                + more.accepted_prediction_tokens,
                rejected_prediction_tokens=have.rejected_prediction_tokens
                + more.rejected_prediction_tokens)

    def wire(self) -> Usage:
        return Usage(
            prompt_tokens=sum(t for t, _ in self._prompts.values()),
            completion_tokens=self._completion,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(c for _, c in self._prompts.values())),
            completion_tokens_details=self._details)


def finish_reason(outcome: Outcome) -> FinishReason:
    """A generation's outcome -> OpenAI's finish reason; a failed or cancelled generation
    raises the error the client gets."""
    if outcome == "stop":
        return "stop"
    if outcome == "length":
        return "length"
    if outcome == "tool_calls":
        return "tool_calls"
    if outcome == "cancelled":
        raise ServiceUnavailable(
            "The generation was cancelled by the server (it is shutting down or the model "
            "stopped).", code="generation_cancelled")
    raise InternalError()


def fingerprint(info: ModelInfo) -> str:
    """Stable per served configuration, like OpenAI's ``system_fingerprint``."""
    digest = hashlib.sha256(f"{info.id}|{info.family}|{info.context_length}".encode())
    return "fp_" + digest.hexdigest()[:10]


async def unless_disconnected(request: Request, work: Awaitable[T],
                              lifecycle: Lifecycle | None = None) -> T | sse.Cut | None:
    """Await ``work`` unless the client disconnects first (then cancel it and return None) or
    the shutdown grace nearly ends (``lifecycle.must_cut()``: cancel it and return ``sse.CUT``).

    Starlette keeps running a non-streaming handler after the client left; without this a
    dropped request would still generate up to max_tokens.
    """
    task: asyncio.Future[Any] = asyncio.ensure_future(work)
    watchers: list[asyncio.Future[Any]] = [asyncio.ensure_future(_disconnected(request))]
    if lifecycle is not None:
        watchers.append(asyncio.ensure_future(_cut(lifecycle)))
    try:
        done, _ = await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()  # type: ignore[no-any-return]
        return sse.CUT if any(isinstance(w.result(), sse.Cut) for w in done) else None
    finally:
        with anyio.CancelScope(shield=True):
            for pending in (task, *watchers):
                pending.cancel()
            await asyncio.gather(task, *watchers, return_exceptions=True)


async def _cut(lifecycle: Lifecycle) -> sse.Cut:
    while not lifecycle.must_cut():
        await asyncio.sleep(sse.CUT_POLL)
    return sse.CUT


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
