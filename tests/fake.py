"""A deterministic :class:`~adapters.base.ChatModel` for the gateway's tests.

It needs no torch and no checkpoint.  One *piece* of text is one token.  The reply is either
scripted (``reply`` / ``pieces``) or derived from the last user message (``transform="echo"`` or
``"reverse"``).  It honours the parts of :class:`~adapters.base.SamplingParams` a gateway must
pass through: ``max_tokens`` (counted in pieces), ``stop`` strings (a partial match is held
back, never emitted), ``seed``/``temperature`` (sampling with a seed rotates the pieces, so the
same seed gives the same reply; greedy or unseeded requests get the script), ``logprobs``, and
``prompt_logprobs`` (the last message's characters are scored, one token each, with the same
deterministic entries; ``max_tokens`` 0 then ends right after them, finish "length").

Counters (:meth:`status`) let tests prove cancellation: ``produced`` counts every piece the fake
generated, ``cancelled`` counts generations closed before they finished.  ``status()`` also
reports ``running``/``waiting`` like a real engine (every active generation runs; none waits).
``max_running`` makes :meth:`prepare` raise :class:`~adapters.base.Overloaded` (a 429) while that
many generations are active, like a real engine whose queue is full.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from adapters.base import (
    AdapterError,
    ChatRequest,
    Delta,
    InvalidRequest,
    Message,
    ModelInfo,
    ModelUnavailable,
    Outcome,
    Overloaded,
    Prompt,
    PromptLogprobs,
    SamplingParams,
    TokenLogprob,
    Tool,
    ToolCall,
    TopLogprob,
    Usage,
)
from adapters.runtime.detokenize import StopMatcher

Transform = Literal["echo", "reverse"]


@dataclass
class FakeCounters:
    """What the fake has done so far (mutable on purpose: tests read it while requests run)."""

    started: int = 0
    finished: int = 0
    cancelled: int = 0
    active: int = 0
    produced: int = 0


class FakeChatModel:
    """A scripted model.  See the module docstring for the semantics.

    ``reply``/``pieces``: the scripted answer; ``pieces`` fixes the token split exactly, ``reply``
    is split every ``piece_chars`` characters.  Without either the answer is the last user
    message, echoed or reversed.  ``delay``: seconds awaited before each piece (an
    ``asyncio.sleep``, like a real engine the fake never blocks the event loop).
    ``fail_after``: end with ``finish_reason="error"`` after that many pieces.
    ``prepare_error``: raised by every :meth:`prepare` (to exercise 4xx/429/503 paths).
    """

    def __init__(
        self,
        model_id: str = "fake",
        *,
        reply: str | None = None,
        pieces: Sequence[str] | None = None,
        piece_chars: int = 1,
        transform: Transform = "echo",
        delay: float = 0.0,
        context_length: int = 4096,
        fail_after: int | None = None,
        prepare_error: AdapterError | None = None,
        max_running: int | None = None,
        description: str = "Deterministic fake model for tests",
        tool_call: ToolCall | None = None,
    ) -> None:
        if piece_chars < 1:
            raise ValueError("piece_chars must be >= 1")
        self.info = ModelInfo(
            id=model_id, family="fake", context_length=context_length, description=description
        )
        self._reply = reply
        self._pieces = tuple(pieces) if pieces is not None else None
        self._piece_chars = piece_chars
        self._transform = transform
        self._delay = delay
        self._fail_after = fail_after
        self._prepare_error = prepare_error
        self._max_running = max_running
        #: answer with this call when a request offers tools, unless the conversation ends with
        #: a tool result (then in text, as an agent loop's last step)
        self._tool_call = tool_call
        #: every request prepare() got
        self.requests: list[ChatRequest] = []
        self._closed = False
        self._answers: dict[tuple[int, ...], str] = {}
        self._calls: set[tuple[int, ...]] = set()  # prompts answered with the tool call
        self.counters = FakeCounters()
        #: every SamplingParams passed to generate, in call order (tests check seed+i for n>1)
        self.calls: list[SamplingParams] = []
        #: every Prompt passed to generate, in call order
        self.prompts: list[Prompt] = []

    # ------------------------------------------------------------------ ChatModel

    def prepare(self, request: ChatRequest) -> Prompt:
        """Fake tokenization: one token per character of ``"role: content"`` lines."""
        messages, tools = request.messages, request.tools
        self.requests.append(request)
        if self._closed:
            raise ModelUnavailable(f"Model '{self.info.id}' has been closed.")
        if self._prepare_error is not None:
            raise self._prepare_error
        if self._max_running is not None and self.counters.active >= self._max_running:
            raise Overloaded(f"Model '{self.info.id}' is at capacity "
                             f"({self.counters.active} running). Please retry shortly.",
                             retry_after=2.0)
        text, token_ids = self._prompt(request)
        wanted = request.completion_budget(len(token_ids), self.info.context_length)
        # The answer is a pure function of the messages, so a cache keyed by the prompt ids is
        # safe and keeps Prompt free of fake-only fields.
        self._answers[token_ids] = self._answer(messages)
        if tools and self._tool_call is not None and messages[-1].role != "tool":
            self._calls.add(token_ids)
        # the last message's content ends the text: its characters are the scored span
        scored = (len(text) - len(messages[-1].content), len(text))
        return Prompt(token_ids=token_ids, params=replace(request.params, max_tokens=wanted),
                      text=text, tools=bool(tools),
                      scored=scored if request.params.prompt_logprobs else None)

    def _prompt(self, request: ChatRequest) -> tuple[str, tuple[int, ...]]:
        if not request.messages:
            raise InvalidRequest("'messages' must contain at least one message.", param="messages")
        text = "\n".join(f"{m.role}: {m.content}" for m in request.messages)
        return text, self.encode(text)

    def tokenize(self, request: ChatRequest) -> tuple[int, ...]:
        """prepare()'s ids, with no capacity or length check (and nothing recorded)."""
        return self._prompt(request)[1]

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(ord(c) for c in text)

    def decode(self, token_ids: Sequence[int]) -> str:
        for i, token_id in enumerate(token_ids):
            if not 0 <= token_id < 0x110000 or 0xD800 <= token_id < 0xE000:
                raise InvalidRequest(f"Token id {token_id} is out of range.",
                                     param=f"tokens.[{i}]")
        return "".join(chr(i) for i in token_ids)

    async def generate(self, prompt: Prompt) -> AsyncIterator[Delta]:
        """Yield one Delta per piece; the last one carries finish_reason and usage."""
        params = prompt.params
        self.calls.append(params)
        self.prompts.append(prompt)
        if prompt.tools and prompt.token_ids in self._calls and self._tool_call is not None:
            yield Delta(finish_reason="tool_calls", tool_calls=(self._tool_call,),
                        usage=Usage(len(prompt.token_ids), 1))
            return
        answer = self._answers.get(prompt.token_ids, prompt.text)
        pieces = self._sample(self._split(answer), params)
        prompt_tokens = len(prompt.token_ids)
        limit = prompt.max_tokens
        stop = StopMatcher(params.stop)
        self.counters.started += 1
        self.counters.active += 1
        produced = 0
        finished = False
        try:
            if prompt.scored is not None and prompt.scored[1] > prompt.scored[0]:
                start, end = prompt.scored
                chars = prompt.text[start:end]
                yield Delta(prompt_logprobs=PromptLogprobs(
                    first=chars[0], first_bytes=tuple(chars[0].encode("utf-8")),
                    following=tuple(entry for i, c in enumerate(chars[1:])
                                    for entry in _logprobs(c, i, params))))
            finish: Outcome = "length" if len(pieces) > limit or limit == 0 else "stop"
            for i, piece in enumerate(pieces[:limit]):
                if self._fail_after is not None and i >= self._fail_after:
                    finish = "error"
                    break
                if self._delay:
                    await asyncio.sleep(self._delay)
                produced += 1
                self.counters.produced += 1
                text = stop.feed(piece)
                logprobs = _logprobs(piece, i, params) if params.logprobs else ()
                if stop.stopped:
                    finish = "stop"
                    if text:
                        yield Delta(text=text, logprobs=logprobs)
                    break
                if text or logprobs:
                    yield Delta(text=text, logprobs=logprobs)
            else:
                tail = stop.flush()
                if tail:
                    yield Delta(text=tail)
            finished = True
            yield Delta(finish_reason=finish, usage=Usage(prompt_tokens, produced))
        finally:
            self.counters.active -= 1
            if finished:
                self.counters.finished += 1
            else:
                self.counters.cancelled += 1

    def status(self) -> dict[str, int]:
        c = self.counters
        return {
            "running": c.active,
            "waiting": 0,
            "started": c.started,
            "finished": c.finished,
            "cancelled": c.cancelled,
            "active": c.active,
            "produced": c.produced,
        }

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tools_seen(self) -> list[tuple[Tool, ...]]:
        """The tools offered to each prepare() call."""
        return [r.tools for r in self.requests]

    @property
    def conversations(self) -> list[list[tuple[str, str]]]:
        """The (role, content) conversation of each prepare() call."""
        return [[(m.role, m.content) for m in r.messages] for r in self.requests]

    # ------------------------------------------------------------------ helpers

    def _answer(self, messages: Sequence[Message]) -> str:
        if self._pieces is not None:
            return "".join(self._pieces)
        if self._reply is not None:
            return self._reply
        last_user = next((m.content for m in reversed(messages) if m.role in ("user", "tool")),
                         "")
        return last_user[::-1] if self._transform == "reverse" else last_user

    def _split(self, answer: str) -> list[str]:
        if self._pieces is not None:
            return list(self._pieces)
        n = self._piece_chars
        return [answer[i : i + n] for i in range(0, len(answer), n)]

    @staticmethod
    def _sample(pieces: list[str], params: SamplingParams) -> list[str]:
        """Sampling with a seed -> a rotation of the pieces chosen by ``Random(seed)``; greedy or
        unseeded -> the script itself, so tests that do not care about sampling stay exact."""
        if params.greedy or params.seed is None or len(pieces) < 2:
            return pieces
        shift = random.Random(params.seed).randrange(len(pieces))
        return pieces[shift:] + pieces[:shift]


def _logprobs(piece: str, index: int, params: SamplingParams) -> tuple[TokenLogprob, ...]:
    """A deterministic, valid-looking logprob entry for one piece (always <= 0)."""
    logprob = 0.0 - 0.125 * (index % 4)  # 0.0, not -0.0, for the first piece
    top = tuple(
        TopLogprob(
            token=piece if k == 0 else f"<alt{k}>",
            logprob=logprob if k == 0 else logprob - k,
            bytes=tuple((piece if k == 0 else f"<alt{k}>").encode("utf-8")),
        )
        for k in range(params.top_logprobs)
    )
    return (
        TokenLogprob(
            token=piece, logprob=logprob, bytes=tuple(piece.encode("utf-8")), top_logprobs=top
        ),
    )
