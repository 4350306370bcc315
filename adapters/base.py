"""The model-side contract: plain data in, text deltas out.

The gateway (HTTP) talks to models only through :class:`ChatModel`.  Everything here is a frozen
dataclass or a protocol; nothing knows about HTTP, FastAPI or pydantic.

Error tree (mapped to OpenAI error bodies once, in ``gateway/errors.py``)::

    AdapterError
     ├── InvalidRequest            a conversation or parameter the model cannot serve   -> 400
     │    └── ContextLengthExceeded  prompt + requested tokens > context                -> 400
     ├── Overloaded                the model's queue is full                            -> 429
     └── ModelUnavailable          the model is not (or no longer) serving              -> 503
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "developer", "user", "assistant", "observation", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]


# --------------------------------------------------------------------------- errors


class AdapterError(Exception):
    """Base of every error a model raises on purpose."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(AdapterError):
    """The request cannot be served by this model (bad conversation, bad parameter)."""


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested completion does not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
            param="messages",
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class Overloaded(AdapterError):
    """The model's waiting queue is full; the client should retry later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after = retry_after


class ModelUnavailable(AdapterError):
    """The model is loading, draining or has stopped."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made (or made earlier in the conversation).
    ``arguments`` is a JSON object as text, as in OpenAI's API."""

    name: str
    arguments: str
    id: str = ""


@dataclass(frozen=True)
class Tool:
    """A function the model may call: OpenAI's ``tools[].function``."""

    name: str
    description: str = ""
    parameters: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    """One chat message. ``content`` is plain text (the gateway joins text parts)."""

    role: Role
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, already validated by the gateway.

    ``max_tokens=None`` means "up to the context limit".  ``temperature == 0`` means greedy.
    ``logit_bias`` maps token id -> additive bias.  ``top_logprobs`` only matters when
    ``logprobs`` is true.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Prompt:
    """A prepared prompt: the exact ids fed to the model and how many tokens may follow."""

    token_ids: tuple[int, ...]
    max_tokens: int
    text: str = ""  # the prompt as a string, for logs and debugging only
    #: the request offered tools and the model can call them: answers may be tool calls
    tools: bool = False


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """OpenAI's per-token logprob entry: the chosen token and its top alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """A piece of a generation.

    ``text`` is new text only (never cumulative).  The last Delta of a generation carries
    ``finish_reason`` and ``usage``; it may also carry final text.
    """

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # only on the last Delta, with finish "tool_calls"


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/models`` shows about a served model."""

    id: str
    family: str
    context_length: int
    description: str = ""
    owned_by: str = "chatglm-gateway"
    extra: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class ChatModel(Protocol):
    """A served model.

    ``prepare`` validates and tokenizes; it may raise :class:`InvalidRequest` and runs before
    any HTTP status is sent.  ``generate`` only finishes: it yields text deltas and ends with one
    Delta carrying ``finish_reason``; closing the iterator early cancels the generation.
    """

    info: ModelInfo

    def prepare(
        self, messages: Sequence[Message], params: SamplingParams, *, tools: Sequence[Tool] = ()
    ) -> Prompt:
        """``tools``: functions the model may call; ignored by models without a tool format."""
        ...

    def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]: ...

    def status(self) -> dict[str, int]: ...

    def close(self) -> None: ...
