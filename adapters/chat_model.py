"""``TorchChatModel``: a ChatGLM checkpoint served through the ``ChatModel`` contract.

``prepare`` turns messages into the official prompt ids (strings -> ids, via the family row) and
validates everything that can fail; ``generate`` hands the ids to the model's engine thread and relays
its deltas to the event loop.  Closing the ``generate`` iterator early cancels the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from adapters.base import (
    ChatRequest,
    ContextLengthExceeded,
    Delta,
    GrammarSpec,
    InvalidRequest,
    ModelInfo,
    Prompt,
)
from adapters.conversation import Conversation, SystemPolicy
from adapters.family import CausalLM, FamilySpec, Tokenizer
from adapters.runtime.engine import Engine
from adapters.runtime.grammar import GrammarError, TokenGrammar

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
        #: generations closed before they finished (a client that left), for /metrics
        self.cancelled = 0
        #: the most bytes one token stands for: a text of n characters is at least
        #: n / longest tokens, which refuses a huge prompt before it is tokenized
        self._longest_token = max(
            (len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)), default=1)
        # The vocabulary as the grammar engine sees it: built once here, on the loading thread.
        self.grammar: TokenGrammar | None = None
        try:
            self.grammar = TokenGrammar(tokenizer, spec.stop_ids)
        except ValueError as exc:  # e.g. a test vocabulary without the family's stop ids
            logger.warning("model '%s': no structured outputs or forced tool calls (%s)",
                           info.id, exc)
        self.engine = Engine(
            model, tokenizer, spec, name=info.id, grammar=self.grammar,
            max_running=max_running, max_waiting=max_waiting, **engine_options,
        )

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def prepare(self, request: ChatRequest) -> Prompt:
        params, tools = request.params, request.tools
        # first: a request that cannot be admitted is refused before any tokenizing
        self.engine.check_capacity(request.generations)
        chars = sum(len(m.content) for m in request.messages)
        if chars > self.context_length * max(self._longest_token, 1):
            raise ContextLengthExceeded(chars // self._longest_token, 1, self.context_length)
        conv, ids, text = self._prompt(request)
        for token_id, _ in params.logit_bias:
            if not 0 <= token_id < self.tokenizer.vocab_size:
                raise InvalidRequest(
                    f"logit_bias token id {token_id} is out of range for this model "
                    f"(0..{self.tokenizer.vocab_size - 1}).",
                    param="logit_bias",
                )
        max_new = request.completion_budget(len(ids), self.context_length)
        grammar = self._grammar(request)
        scored = None
        if params.prompt_logprobs:
            if self.spec.query_span is None:
                raise InvalidRequest(f"Model '{self.info.id}' cannot score its prompt.",
                                     param="logprobs")
            scored = self.spec.query_span(self.tokenizer, conv, ids)
        return Prompt(token_ids=tuple(ids), params=replace(params, max_tokens=max_new),
                      text=text, tools=bool(tools), grammar=grammar, scored=scored,
                      prediction_ids=self._prediction(request.prediction))

    def _prediction(self, text: str | None) -> tuple[int, ...] | None:
        """The predicted answer's ids: plain text as the answer's ids would spell it (no
        control ids).  One longer than any answer could be is refused before tokenizing."""
        if text is None:
            return None
        if len(text) > self.context_length * max(self._longest_token, 1):
            raise InvalidRequest(
                f"The prediction is longer than any answer of this model could be (its context "
                f"holds {self.context_length} tokens).", param="prediction")
        return tuple(self.tokenizer.encode(text))

    def _prompt(self, request: ChatRequest) -> tuple[Conversation, list[int], str]:
        """The family's conversation (system policy, tools), and the prompt's ids and text in
        its official prompt format."""
        conv = self.spec.to_conversation(request.messages, request.tools, self.system_policy)
        ids, text = self.spec.build_prompt(self.tokenizer, conv)
        return conv, ids, text

    def tokenize(self, request: ChatRequest) -> tuple[int, ...]:
        return tuple(self._prompt(request)[1])

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        vocab = self.tokenizer.vocab_size
        for i, token_id in enumerate(token_ids):
            if not 0 <= token_id < vocab:
                raise InvalidRequest(f"Token id {token_id} is out of range for this model "
                                     f"(0..{vocab - 1}).", param=f"tokens.[{i}]")
        return self.tokenizer.decode(token_ids)

    def _grammar(self, request: ChatRequest) -> GrammarSpec | None:
        """The request's grammar, compiled now so that a bad one is a 400 before any byte is
        sent (the engine's matchers reuse the compiled grammar)."""
        if request.tools:
            grammar, param = self.spec.tool_grammar(request.tools, request.tool_choice), "tools"
        else:
            grammar, param = request.grammar, "response_format"
        if grammar is not None:
            if self.grammar is None:
                raise InvalidRequest(f"Model '{self.info.id}' cannot constrain its output.",
                                     param=param)
            try:
                self.grammar.compile(grammar)
            except GrammarError as exc:
                raise InvalidRequest(f"The {param.replace('_', ' ')} cannot be used as a "
                                     f"grammar: {exc}", param=param) from exc
        return grammar

    async def generate(self, prompt: Prompt) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        def deliver(delta: Delta) -> None:  # runs on the engine thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, delta)

        seq = self.engine.submit(prompt, deliver)
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:
                self.cancelled += 1  # closed early: the client left
            self.engine.cancel(seq)

    def status(self) -> dict[str, int]:
        return {**self.engine.counts(), **self.engine.cache_counts(),
                "cancelled": self.cancelled}

    def close(self) -> None:
        self.engine.close()

