"""``TorchChatModel``: a ChatGLM checkpoint served through the ``ChatModel`` contract.

``prepare`` turns messages into the official prompt ids (strings -> ids, via the family row) and
validates everything that can fail; ``generate`` hands the ids to the model's engine thread and relays
its deltas to the event loop.  Closing the ``generate`` iterator early cancels the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from adapters.base import (
    ChatRequest,
    Delta,
    InvalidRequest,
    ModelInfo,
    Prompt,
)
from adapters.conversation import SystemPolicy
from adapters.family import CausalLM, FamilySpec, Tokenizer
from adapters.runtime.engine import Engine

logger = logging.getLogger(__name__)


class TorchChatModel:
    def __init__(
        self,
        info: ModelInfo,
        spec: FamilySpec,
        tokenizer: Tokenizer,
        model: CausalLM,
        *,
        system_policy: SystemPolicy = "prepend",
        max_running: int = 8,
        max_waiting: int = 64,
        **engine_options: Any,
    ):
        self.info = info
        self.spec = spec
        self.tokenizer = tokenizer
        self.model = model
        self.system_policy = system_policy
        self.engine = Engine(
            model, tokenizer, spec, name=info.id, max_running=max_running,
            max_waiting=max_waiting, **engine_options,
        )

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def prepare(self, request: ChatRequest) -> Prompt:
        params = request.params
        tools = request.tools if self.spec.supports_tools else ()  # no tool format: unused
        conv = self.spec.to_conversation(request.messages, tools, self.system_policy)
        ids, text = self.spec.build_prompt(self.tokenizer, conv)
        for token_id, _ in params.logit_bias:
            if not 0 <= token_id < self.tokenizer.vocab_size:
                raise InvalidRequest(
                    f"logit_bias token id {token_id} is out of range for this model "
                    f"(0..{self.tokenizer.vocab_size - 1}).",
                    param="logit_bias",
                )
        max_new = request.completion_budget(len(ids), self.context_length)
        self.engine.check_capacity()
        return Prompt(token_ids=tuple(ids), params=replace(params, max_tokens=max_new),
                      text=text, tools=bool(tools))

    async def generate(self, prompt: Prompt) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        def deliver(delta: Delta) -> None:  # runs on the engine thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, delta)

        seq = self.engine.submit(prompt, deliver)
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self.engine.cancel(seq)

    def status(self) -> dict[str, int]:
        return self.engine.counts()

    def close(self) -> None:
        self.engine.close()

