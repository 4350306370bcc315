"""``n`` model generations merged into one stream of ``(choice index, Delta)``, closed once.

Each choice's ``generate()`` iterator is advanced by its own small task, so a slow choice never
delays a fast one and the items come out as they are produced.  Whoever opens a
:class:`ChoiceStream` must :meth:`~ChoiceStream.aclose` it (a ``finally``): that cancels the
pending reads and closes every model iterator, which is how the model learns that the client
went away (``adapters/base.py``: closing the iterator early = cancel).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import anyio

from adapters.base import Delta

logger = logging.getLogger(__name__)


class ChoiceStream:
    """Async iterator of ``(index, Delta)`` over several generations."""

    def __init__(self, generations: Sequence[AsyncIterator[Delta]]) -> None:
        self._generations = list(generations)
        self._live = set(range(len(self._generations)))
        self._reads: dict[int, asyncio.Task[Delta | None]] = {}
        self._primed: tuple[int, Delta] | None = None
        self._closed = False

    def __aiter__(self) -> ChoiceStream:
        return self

    async def prime(self) -> None:
        """Fetch the first item now, so a failure at the first step still becomes an HTTP
        status (the response has not started yet)."""
        self._primed = await self.__anext__()

    def peek(self) -> tuple[int, Delta] | None:
        """The primed item, if :meth:`prime` ran and nothing has been read since."""
        return self._primed

    async def __anext__(self) -> tuple[int, Delta]:
        if self._primed is not None:
            item, self._primed = self._primed, None
            return item
        if self._closed:
            raise StopAsyncIteration
        for index in self._live - self._reads.keys():
            self._reads[index] = asyncio.ensure_future(_next_delta(self._generations[index]))
        if not self._reads:
            raise StopAsyncIteration
        done, _ = await asyncio.wait(self._reads.values(), return_when=asyncio.FIRST_COMPLETED)
        # Lowest index first among the finished reads: deterministic order in tests.
        index = min(i for i, task in self._reads.items() if task in done)
        delta = self._reads.pop(index).result()
        if delta is None:
            # The contract says the last Delta carries finish_reason: a broken model.
            self._live.discard(index)
            raise RuntimeError(f"generation {index} ended without a finish_reason")
        if delta.finish_reason is not None:
            self._live.discard(index)
        return index, delta

    async def aclose(self) -> None:
        """Cancel pending reads and close every generation.  Idempotent; runs to the end even
        when the calling task is being cancelled (a disconnect cancels the response task)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for task in self._reads.values():
                task.cancel()
            if self._reads:
                await asyncio.gather(*self._reads.values(), return_exceptions=True)
            self._reads.clear()
            for generation in self._generations:
                aclose = getattr(generation, "aclose", None)
                if aclose is None:
                    continue
                try:
                    await aclose()
                except Exception:  # a model's cleanup failing must not hide the first error
                    logger.exception("closing a generation failed")


async def _next_delta(generation: AsyncIterator[Delta]) -> Delta | None:
    """The next Delta, or None at the end (StopAsyncIteration must not escape a Task)."""
    try:
        return await generation.__anext__()
    except StopAsyncIteration:
        return None
