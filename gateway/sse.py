"""The one Server-Sent Events core: a route's chunks out as an OpenAI-style event stream.

Events are ``data: <json>\\n\\n`` with LF line ends and no ``event:``/``id:`` fields; the last
is ``data: [DONE]``.  Keep-alive pings are SSE comments (``: ping``), which OpenAI's SDK skips,
sent after ``ping_seconds`` without an event.  An error once the stream has started (the status
is sent already) goes out as one ``data: {"error": {...}}`` event, and the stream ends without
``[DONE]``.  The model's :class:`~gateway.choices.ChoiceStream` is closed in every case.

The Responses API's stream (:data:`RESPONSES`) differs in two ways, as OpenAI sends it: every
event also names itself (``event: <its type>``), and there is no ``[DONE]``.

The routes' stream modules (``chat_stream``, ``completion_stream``, ``responses_stream``) only turn
Deltas into their chunk objects; everything about the wire is here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from gateway.choices import ChoiceStream
from gateway.errors import ServiceUnavailable, from_exception

logger = logging.getLogger(__name__)

DONE = "[DONE]"

T = TypeVar("T")


@dataclass(frozen=True)
class Wire:
    """How a route's events are written: ``named``, each carries ``event: <chunk.type>`` (and an
    error ``event: error``); ``done``, the data of the last event (None: none)."""

    named: bool = False
    done: str | None = DONE


#: chat and legacy completions: data-only chunks, then ``data: [DONE]``
CHUNKS = Wire()
#: the Responses API: named events, no ``[DONE]`` (the last event is ``response.completed``)
RESPONSES = Wire(named=True, done=None)


def response(chunks: AsyncIterator[BaseModel], stream: ChoiceStream, *, name: str,
             ping_seconds: float = 0.0, shutdown_grace: float = 0.0,
             cut: Callable[[], bool] = lambda: False, wire: Wire = CHUNKS) -> EventSourceResponse:
    """The SSE response sending ``chunks`` (read from ``stream``, closed after it in every case,
    even if the body never started because the client left at once).

    sse-starlette ends every stream as soon as uvicorn starts shutting down; with
    ``shutdown_grace`` the stream may first run to its end for that long (the drain), and ends
    itself with an error event and ``[DONE]`` once ``cut()`` says the grace is nearly over.
    """
    return EventSourceResponse(
        events(chunks, stream, name=name, ping_seconds=ping_seconds, cut=cut, wire=wire),
        sep="\n",
        ping=0,  # events() sends the keep-alive comments, in the format above
        shutdown_grace_period=shutdown_grace,
        background=BackgroundTask(stream.aclose),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def events(chunks: AsyncIterator[BaseModel], stream: ChoiceStream, *, name: str = "",
                 ping_seconds: float = 0.0,
                 cut: Callable[[], bool] = lambda: False,
                 wire: Wire = CHUNKS) -> AsyncIterator[str | ServerSentEvent]:
    """The data of each SSE event, in order (sse-starlette adds ``data: `` and the blank line),
    with a comment event after every ``ping_seconds`` without one (0 = never).  ``name`` (the
    completion id) only names the stream in logs; ``cut()`` true ends the stream with an error
    event and ``[DONE]`` (the server's shutdown grace is nearly over)."""
    pinged = _with_pings(chunks, ping_seconds, cut)
    try:
        async for chunk in pinged:
            if isinstance(chunk, Cut):
                logger.info("stream %s cut: the shutdown grace period ended", name)
                yield _error_event(cut_error().body(), wire)
                break
            if chunk is None:
                yield ServerSentEvent(comment="ping", sep="\n")
            elif wire.named:
                yield ServerSentEvent(chunk.model_dump_json(), event=getattr(chunk, "type", None),
                                      sep="\n")
            else:
                yield chunk.model_dump_json()
        if wire.done is not None:
            yield wire.done
    except Exception as exc:  # the status is sent already: report in-band, then stop
        error = from_exception(exc)
        logger.warning("stream %s ended with an error: %s", name, error.message)
        yield _error_event(error.body(), wire)
    finally:
        await pinged.aclose()
        await stream.aclose()


def cut_error() -> ServiceUnavailable:
    return ServiceUnavailable("The server is shutting down: this answer was cut at the end of "
                              "its grace period.", code="server_draining")


def json_event(body: dict[str, object]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _error_event(body: dict[str, object], wire: Wire) -> str | ServerSentEvent:
    # OpenAI's SDKs raise an APIError for a data line holding "error", named or not.
    data = json_event(body)
    return ServerSentEvent(data, event="error", sep="\n") if wire.named else data


#: How often a stream checks whether the shutdown grace is over (a signal handler sets it).
CUT_POLL = 0.5


class Cut:
    """The marker of a response ended by the end of the shutdown grace."""


CUT = Cut()


async def _with_pings(items: AsyncIterator[T], seconds: float,
                      cut: Callable[[], bool]) -> AsyncGenerator[T | None | Cut, None]:
    """Every item of ``items``, with a None after each ``seconds`` without one (0 = never),
    and :data:`CUT` (then the end) once ``cut()`` is true.

    The pending read runs in its own task so that a ping never interrupts it; it is cancelled,
    and ``items`` closed, however this generator ends (it must not be closed while a read of
    it runs, so no one else closes it).
    """
    read: asyncio.Task[tuple[T] | None] | None = None
    loop = asyncio.get_running_loop()
    last = loop.time()
    try:
        while True:
            if cut():
                yield CUT
                return
            if read is None:
                read = asyncio.ensure_future(_next(items))
            wait = min(seconds - (loop.time() - last), CUT_POLL) if seconds else CUT_POLL
            done, _ = await asyncio.wait({read}, timeout=max(wait, 0.0))
            if not done:
                if seconds and loop.time() - last >= seconds:
                    last = loop.time()
                    yield None
                continue
            last = loop.time()
            item, read = read.result(), None
            if item is None:
                return
            yield item[0]
    finally:
        with anyio.CancelScope(shield=True):  # a disconnect cancels the task running this
            if read is not None:
                read.cancel()
                await asyncio.gather(read, return_exceptions=True)
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()


async def _next(items: AsyncIterator[T]) -> tuple[T] | None:
    """The next item (boxed, so that an item may be None), or None at the end:
    StopAsyncIteration must not escape a Task."""
    try:
        return (await items.__anext__(),)
    except StopAsyncIteration:
        return None
