"""``ModelReplica``: one Ray Serve replica of a model, the real ``ChatModel`` inside.

Each replica loads the checkpoint through the registry (:func:`~adapters.registry.load_chat_model`)
and runs its own engine thread.  Its methods are the boundary's, over plain data:
``prepare`` answers a :class:`~adapters.base.Prompt` or a :class:`Refusal` (the adapter error as
data), ``generate`` is a streaming method (an async generator: Ray Serve streams each Delta as it
is produced) whose first Delta names the replica.  When the caller cancels the stream, Ray Serve
cancels the generator's task here, and the model's ``generate`` cancels the request in the
engine at its next step, as in a single process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any

import ray
from ray import serve

from adapters.base import AdapterError, ChatRequest, Delta, ModelInfo, Prompt
from adapters.distributed.board import REPORT_SECONDS, board
from adapters.distributed.refusal import Refusal
from adapters.distributed.replicas import ReplicaStatus

logger = logging.getLogger(__name__)


def _cpu_share(node_id: str) -> float:
    """This replica's CPUs over its node's (1.0 where Ray does not say): a CPU replica's default
    KV budget is that share of what a single process would take, so however many replicas Ray
    packs onto a node, their default budgets add up to one process's."""
    mine = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    node = next((n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes()
                 if n.get("NodeID") == node_id), 0.0)
    return mine / node if mine > 0 and node > 0 else 1.0


class ModelReplica:
    """The deployment's class (``serve.deployment(ModelReplica)``); ``load`` holds the keyword
    arguments of ``load_chat_model`` (plain values)."""

    def __init__(self, model_id: str, path: str, load: Mapping[str, Any]) -> None:
        # Imported here: the registry pulls in torch, which the gateway process never needs.
        from adapters.registry import load_chat_model

        self.node_id = ray.get_runtime_context().get_node_id()
        self.model = load_chat_model(model_id, path, **load, machine_share=_cpu_share(self.node_id))
        self.model_id = model_id
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report, name="status-report", daemon=True)
        self._reporter.start()
        logger.info("replica %s of model '%s' serving on node %s", self.replica_id, model_id,
                    self.node_id)

    def info(self) -> ModelInfo:
        return self.model.info

    async def prepare(self, request: ChatRequest) -> Prompt | Refusal:
        # generations=0: admission is the gateway's, over every replica (the generations go
        # wherever the router sends them, not necessarily here); this engine still refuses
        # what it cannot queue when a generation is submitted.
        # On a worker thread: tokenizing a long conversation must not hold up this replica's
        # event loop, which streams every running request's deltas.
        return await self._call(self.model.prepare, replace(request, generations=0))

    async def tokenize(self, request: ChatRequest) -> tuple[int, ...] | Refusal:
        return await self._call(self.model.tokenize, request)

    async def encode(self, text: str) -> tuple[int, ...] | Refusal:
        return await self._call(self.model.encode, text)

    async def decode(self, token_ids: tuple[int, ...]) -> str | Refusal:
        return await self._call(self.model.decode, token_ids)

    @staticmethod
    async def _call(method: Callable[[Any], Any], argument: Any) -> Any:
        """``method(argument)`` on a worker thread; an adapter error comes back as data."""
        try:
            return await asyncio.to_thread(method, argument)
        except AdapterError as error:
            return Refusal.of(error)

    async def generate(self, prompt: Prompt) -> AsyncIterator[Delta]:
        first = True
        async for delta in self.model.generate(prompt):
            yield replace(delta, replica=self.replica_id) if first else delta
            first = False

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(self.replica_id, self.node_id, self.model.status(), os.getpid())

    def _report(self) -> None:
        """Post this replica's status to the board every REPORT_SECONDS (a deployment
        started by ``serve deploy`` before any gateway runs finds the board once one does)."""
        target = None
        while not self._stop.wait(REPORT_SECONDS):
            try:
                target = target or board()
                if target is not None:
                    target.post.remote(self.model_id, self.status())
            except Exception:  # the board restarting; the next report tries again
                logger.debug("status report failed", exc_info=True)
                target = None

    def __del__(self) -> None:
        # Ray Serve calls __del__ when it stops a replica (scale-down, delete, shutdown).
        self._stop.set()
        target = board()
        if target is not None:
            target.gone.remote(self.model_id, self.replica_id)
        self.model.close()
