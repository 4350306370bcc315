"""OpenAI's chat-completion wire format as pydantic v2 models: the one wire-schema file.

Fields are ordered like OpenAI's API reference.  Requests are validated strictly (a string is
not a number, ``1.0`` is not an integer, NaN/Infinity are rejected); every failure becomes a
400 ``invalid_request_error`` naming the field in ``param`` (see ``gateway/errors.py``).

Documented choices:

* ``max_tokens`` and ``max_completion_tokens`` both given: ``max_completion_tokens`` wins (it
  replaces the deprecated ``max_tokens`` in OpenAI's API).
* ``content`` may be a string or an array of ``{"type": "text", "text": ...}`` parts; the parts
  are joined with ``"\\n"``.  Any other part type (images, audio, files) is a 400.
* ``top_k`` and ``repetition_penalty`` are extensions (as in vLLM and THUDM's own demo).
* The fields in :data:`IGNORED_FIELDS` are accepted and ignored; unknown fields are allowed.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from adapters.base import Message, SamplingParams

#: OpenAI request fields this gateway accepts and ignores (documented in the README).
IGNORED_FIELDS: tuple[str, ...] = (
    "tools",
    "tool_choice",
    "response_format",
    "parallel_tool_calls",
    "service_tier",
    "store",
    "metadata",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "functions",
    "function_call",
    "web_search_options",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
)

MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20

_REQUEST_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
_RESPONSE_CONFIG = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- request


class TextContentPart(BaseModel):
    """``{"type": "text", "text": "..."}``; the only content part a text model accepts."""

    model_config = _REQUEST_CONFIG

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> TextContentPart:
        if self.type != "text":
            raise ValueError(
                f"Content part type '{self.type}' is not supported; only 'text' parts are."
            )
        if self.text is None:
            raise ValueError("A 'text' content part needs a 'text' string.")
        return self


class ChatMessage(BaseModel):
    """One input message.  ``content`` may be null only for assistant messages."""

    model_config = _REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # accepted (assistant history), ignored
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"A '{self.role}' message needs 'content'.")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    include_usage: bool | None = None


Probability = Annotated[float, Field(ge=-2.0, le=2.0)]


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = _REQUEST_CONFIG

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    audio: Any | None = None
    frequency_penalty: Probability | None = None
    function_call: Any | None = None
    functions: Any | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    metadata: Any | None = None
    modalities: Any | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    parallel_tool_calls: Any | None = None
    prediction: Any | None = None
    presence_penalty: Probability | None = None
    prompt_cache_key: Any | None = None
    reasoning_effort: Any | None = None
    response_format: Any | None = None
    safety_identifier: Any | None = None
    seed: int | None = None
    service_tier: Any | None = None
    stop: str | list[str] | None = None
    store: Any | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    tool_choice: Any | None = None
    tools: Any | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = None
    verbosity: Any | None = None
    web_search_options: Any | None = None
    # extensions (vLLM / THUDM demo names)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"At most {MAX_STOP} stop sequences are allowed.")
        if any(s == "" for s in stops):
            raise ValueError("Stop sequences must be non-empty strings.")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not re.fullmatch(r"[0-9]+", key):
                raise ValueError(f"Logit bias keys must be token ids (integers); got '{key}'.")
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        if self.stream_options is not None and not self.stream:
            raise FieldError(
                "stream_options", "'stream_options' is only allowed when 'stream' is true."
            )
        return self

    # ---------------------------------------------------------------- translation

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_messages(self) -> tuple[Message, ...]:
        return tuple(Message(role=m.role, content=m.text(), name=m.name) for m in self.messages)

    def to_sampling_params(self) -> SamplingParams:
        """The adapter's frozen params; unset fields keep the SamplingParams defaults."""
        given: dict[str, Any] = {
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
        }
        kwargs = {k: v for k, v in given.items() if v is not None}
        if self.stop is not None:
            kwargs["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.logit_bias:
            kwargs["logit_bias"] = tuple(
                sorted((int(k), float(b)) for k, b in self.logit_bias.items())
            )
        return SamplingParams(**kwargs)


class FieldError(ValueError):
    """A cross-field check failing on one named field; ``gateway/errors.py`` reads ``param``
    from it (pydantic reports model-level errors without a location)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# --------------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class TopLogprob(BaseModel):
    model_config = _RESPONSE_CONFIG

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    model_config = _RESPONSE_CONFIG

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    model_config = _RESPONSE_CONFIG

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Usage(BaseModel):
    model_config = _RESPONSE_CONFIG

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    model_config = _RESPONSE_CONFIG

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class Choice(BaseModel):
    model_config = _RESPONSE_CONFIG

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    model_config = _RESPONSE_CONFIG

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChoiceDelta(BaseModel):
    """A chunk's delta; unset fields are left out, like OpenAI's ``{}`` finish delta."""

    model_config = _RESPONSE_CONFIG

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    model_config = _RESPONSE_CONFIG

    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    model_config = _RESPONSE_CONFIG

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None

    @model_serializer(mode="wrap")
    def _drop_null_usage(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


class ModelCard(BaseModel):
    """One entry of GET /v1/models; ``family``, ``context_length``, ``description`` are ours."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    family: str
    context_length: int
    description: str = ""
    aliases: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
