"""``RemoteChatModel``: the ``ChatModel`` the gateway serves, forwarding to a Ray Serve deployment.

``prepare`` runs on a replica (the gateway calls it on a worker thread, so a blocking call is
fine) and raises the replica's adapter error again, before any byte goes to the client.
``generate`` streams the replica's deltas through ``handle.options(stream=True)``; closing it
cancels the call, which cancels the request in its replica.  A replica that dies mid-request
(killed, out of memory) ends the generation with a "cancelled" Delta: the gateway answers a 503
(or an in-band error event once streaming began), never a hang; Ray Serve replaces the replica
and routes new requests to the live ones meanwhile.

``status()``, ``replicas()`` and admission read a snapshot of the status board that a background
thread refreshes (see ``board.py``): nothing here waits on Ray while the event loop runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray
from ray import serve

from adapters.base import (
    ChatRequest,
    Delta,
    InvalidRequest,
    ModelInfo,
    ModelUnavailable,
    Overloaded,
    Prompt,
    Usage,
)
from adapters.distributed.board import REPORT_SECONDS
from adapters.distributed.refusal import Refusal
from adapters.distributed.replicas import ReplicaStatus

logger = logging.getLogger(__name__)

#: how long a call to a replica may take before the request fails with a 503 (a replica being
#: replaced, a cluster that lost its nodes); generation streams have no limit
CALL_TIMEOUT = 60.0
#: calls to replicas per request: a replica that fails before sending anything is replaced by
#: another one (``prepare`` is pure, and a generation that sent nothing can start over)
ATTEMPTS = 2


class RemoteChatModel:
    def __init__(self, info: ModelInfo, handle: serve.handle.DeploymentHandle,
                 board: ray.actor.ActorHandle, *, capacity: int, owned: bool = True) -> None:
        self.info = info
        #: this gateway deployed the application (and deletes it when it closes); one deployed
        #: by ``serve deploy`` or another gateway is left running
        self._owned = owned
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._board = board
        #: generations one replica holds (its engine's running + waiting)
        self._capacity = capacity
        self._generations = 0  # started here and not finished (admission across replicas)
        self._replicas: list[ReplicaStatus] = []
        self._stop = threading.Event()
        self._refresh()
        self._poller = threading.Thread(target=self._poll, name=f"replicas-{info.id}",
                                        daemon=True)
        self._poller.start()

    @property
    def context_length(self) -> int:
        return self.info.context_length

    def prepare(self, request: ChatRequest) -> Prompt:
        live = len(self._replicas)
        if live == 0:
            raise ModelUnavailable(f"Model '{self.info.id}' has no replica serving right now. "
                                   "Please retry shortly.", code="no_replica")
        if request.generations > live * self._capacity:
            raise InvalidRequest(
                f"The request asks for {request.generations} generations (prompts x n); model "
                f"'{self.info.id}' runs at most {live * self._capacity} at once on its {live} "
                "replicas.", param="n")
        if self._generations + request.generations > live * self._capacity:
            raise Overloaded(
                f"Model '{self.info.id}' is at capacity ({self._generations} of "
                f"{live * self._capacity} generations on {live} replicas). Please retry "
                "shortly.", retry_after=1.0)
        answer = self._call("prepare", request)
        assert isinstance(answer, Prompt)
        return answer

    def tokenize(self, request: ChatRequest) -> tuple[int, ...]:
        if not self._replicas:
            raise ModelUnavailable(f"Model '{self.info.id}' has no replica serving right now. "
                                   "Please retry shortly.", code="no_replica")
        return tuple(self._call("tokenize", request))

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self._call("encode", text))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._call("decode", tuple(token_ids)))

    def _call(self, method: str, argument: Any) -> Any:
        """``method(argument)`` on a replica (blocking: the gateway calls from a worker
        thread); its adapter error raised again here, a lost replica retried once."""
        answer = None
        for attempt in range(ATTEMPTS):
            try:
                answer = getattr(self._handle, method).remote(argument).result(
                    timeout_s=CALL_TIMEOUT)
                break
            except Exception as exc:  # a replica died under the call, or the cluster is gone
                logger.warning("model '%s': %s failed on a replica: %r", self.info.id, method,
                               exc)
                if attempt + 1 == ATTEMPTS:
                    raise ModelUnavailable(
                        f"Model '{self.info.id}' lost the replica serving this request. "
                        "Please retry.", code="replica_failed") from exc
        if isinstance(answer, Refusal):
            raise answer.error()
        return answer

    async def generate(self, prompt: Prompt) -> AsyncIterator[Delta]:
        self._generations += 1
        try:
            for attempt in range(ATTEMPTS):
                call: Any = self._stream.generate.remote(prompt)  # DeploymentResponseGenerator
                started = finished = False
                try:
                    async for delta in call:
                        started = True
                        yield delta
                        if delta.finish_reason is not None:
                            finished = True
                            return
                    logger.warning("model '%s': a replica's stream ended without a finish",
                                   self.info.id)
                except Exception as exc:  # the replica died (RayActorError and kin) or failed
                    logger.warning("model '%s': a generation ended with its replica: %r",
                                   self.info.id, exc)
                finally:
                    if not finished:
                        call.cancel()  # the client left (or the replica failed): stop it there
                if started or attempt + 1 == ATTEMPTS:
                    break
                # Nothing was sent yet: the same prompt on another replica gives the same answer.
        finally:
            self._generations -= 1
        # Here only when the replica failed: the gateway answers 503 / an error event.
        yield Delta(finish_reason="cancelled",
                    usage=Usage(prompt_tokens=len(prompt.token_ids), completion_tokens=0))

    def status(self) -> dict[str, int]:
        """The replicas' counts summed (running, waiting, KV-cache bytes, prefix tokens)."""
        total: dict[str, int] = {}
        for replica in self._replicas:
            for key, value in replica.counts.items():
                total[key] = total.get(key, 0) + value
        return total

    def replicas(self) -> Sequence[ReplicaStatus]:
        return list(self._replicas)

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=5)
        if not self._owned:
            return
        try:
            serve.delete(self.info.id)
        except Exception:  # the cluster went first; nothing is left to delete
            logger.exception("deleting the Ray Serve application '%s' failed", self.info.id)

    def _poll(self) -> None:
        while not self._stop.wait(REPORT_SECONDS):
            self._refresh()

    def _refresh(self) -> None:
        try:
            replicas: Any = ray.get(self._board.read.remote(self.info.id), timeout=10)
        except Exception:  # keep the last snapshot; the next poll tries again
            logger.warning("model '%s': reading the replicas' status failed", self.info.id,
                           exc_info=True)
            return
        self._replicas = list(replicas)
