"""What every model route shares: resolve the model, start its generations, wait for them.

Every error that can be known before the first token (an unknown model, a conversation the model
rejects, a full queue, even a failure at the first generation step) is raised before the response
starts, so it reaches the client as a real status code.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import anyio
from fastapi import Request

from adapters.base import ModelInfo, Prompt
from gateway.catalog import ModelCatalog, ServedModel
from gateway.choices import ChoiceStream
from gateway.lifecycle import Lifecycle
from gateway.metrics import GatewayMetrics
from gateway.streaming import finish_reason

T = TypeVar("T")

#: nginx's code for "client closed the request"; nobody reads it, it only shows in access logs.
CLIENT_CLOSED = 499


def admit(request: Request) -> None:
    """A router dependency of the model routes: 503 while the server drains."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    lifecycle.check_admission()


def resolve_model(request: Request, name: str | None) -> ServedModel:
    """The served model named ``name`` (None: the first configured one); its id is recorded
    for the request metrics."""
    catalog: ModelCatalog = request.app.state.catalog
    served = catalog.first() if name is None else catalog.resolve(name)
    request.state.model = served.model.info.id
    return served


async def start(request: Request, served: ServedModel, prompts: Sequence[Prompt]) -> ChoiceStream:
    """Start one generation per prompt (one per choice) and wait for the first Delta; a failure
    there raises (and closes everything) while a status can still be sent."""
    metrics: GatewayMetrics = request.app.state.metrics
    model = served.model
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
    except BaseException:
        await stream.aclose()
        raise
    return stream


def fingerprint(info: ModelInfo) -> str:
    """Stable per served configuration, like OpenAI's ``system_fingerprint``."""
    digest = hashlib.sha256(f"{info.id}|{info.family}|{info.context_length}".encode())
    return "fp_" + digest.hexdigest()[:10]


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first (then cancel it and return None).

    Starlette keeps running a non-streaming handler after the client left; without this a
    dropped request would still generate up to max_tokens.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        return None
    finally:
        with anyio.CancelScope(shield=True):
            for pending in (task, watcher):
                pending.cancel()
            await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
