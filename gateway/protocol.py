"""OpenAI's chat-completion wire format as pydantic v2 models: the one wire-schema file.

Fields are ordered like OpenAI's API reference, the sampling fields both completion routes
share (:class:`SamplingRequest`) after a route's inputs and before its other fields.  Requests
are validated strictly (a string is not a number, ``1.0`` is not an integer, NaN/Infinity are
rejected); every failure becomes a 400 ``invalid_request_error`` naming the field in ``param``
(:func:`validated`, mapped in ``gateway/errors.py``).

Documented choices:

* ``max_tokens`` and ``max_completion_tokens`` both given: ``max_completion_tokens`` wins (it
  replaces the deprecated ``max_tokens`` in OpenAI's API).
* ``content`` may be a string or an array of ``{"type": "text", "text": ...}`` parts; the parts
  are joined with ``"\\n"``.  Any other part type (images, audio, files) is a 400.
* ``prediction`` (Predicted Outputs): its text parts are concatenated as they are; as OpenAI
  does, it cannot be combined with ``n`` > 1, ``logprobs`` or tools the model may call (here
  the limits are kept for compatibility: the drafts are verified losslessly either way).
* ``top_k``, ``repetition_penalty`` and ``structured_outputs`` are extensions (vLLM's names;
  THUDM's demo has the first two too).
* Per-request caps (``MAX_N``, ``MAX_PROMPTS``, ``MAX_STOP``, ``MAX_LOGIT_BIAS``, ``MAX_SEED``)
  keep one request from taking the whole server; they are documented in the README.
* The fields in :data:`IGNORED_FIELDS` are accepted and ignored; unknown fields are allowed.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from adapters.base import (
    FinishReason,
    GrammarSpec,
    Message,
    SamplingParams,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from gateway.errors import FieldError, from_validation

#: OpenAI request fields this gateway accepts and ignores (documented in the README).
IGNORED_FIELDS: tuple[str, ...] = (
    "service_tier",
    "store",
    "metadata",
    "modalities",
    "audio",
    "reasoning_effort",
    "functions",
    "function_call",
    "web_search_options",
    "verbosity",
    "safety_identifier",
)

MAX_N = 16
MAX_STOP = 4
#: prompts in one legacy completion request (each is one generation per choice)
MAX_PROMPTS = 64
#: OpenAI's limit on logit_bias entries
MAX_LOGIT_BIAS = 300
#: seeds are 64-bit: choice i of a request samples with seed + i, so seed + n - 1 must fit too
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20

_REQUEST_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
_RESPONSE_CONFIG = ConfigDict(extra="forbid")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def validated(model: type[M], raw: bytes) -> M:
    """Parse a JSON body into ``model``; any failure is a
    :class:`~gateway.errors.RequestInvalid` (400)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise from_validation(err) from None


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


class Prediction(BaseModel):
    """OpenAI's Predicted Outputs: ``{"type": "content", "content": text or text parts}``, the
    answer the client expects (drafts for speculative decoding; never changes the answer)."""

    model_config = _REQUEST_CONFIG

    type: Literal["content"]
    content: str | list[TextContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class FunctionCall(BaseModel):
    model_config = _REQUEST_CONFIG

    name: str = Field(min_length=1)
    arguments: str = ""


class ToolCallParam(BaseModel):
    """An earlier tool call in an assistant message."""

    model_config = _REQUEST_CONFIG

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = _REQUEST_CONFIG

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = _REQUEST_CONFIG

    type: Literal["function"]
    function: FunctionDefinition


class ChatMessage(BaseModel):
    """One input message.  ``content`` may be null only for assistant messages."""

    model_config = _REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
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


class NamedFunction(BaseModel):
    model_config = _REQUEST_CONFIG

    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: a call to exactly that function."""

    model_config = _REQUEST_CONFIG

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's structured-outputs schema wrapper."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow",
                              populate_by_name=True)

    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``."""

    model_config = _REQUEST_CONFIG

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None
                                           or self.json_schema.schema_ is None):
            raise ValueError("A 'json_schema' response format needs 'json_schema.schema'.")
        return self

    def to_grammar(self) -> GrammarSpec | None:
        if self.type == "json_object":
            return GrammarSpec(kind="json_object")
        if self.type == "json_schema":
            assert self.json_schema is not None and self.json_schema.schema_ is not None
            return GrammarSpec(kind="json_schema", value=json.dumps(self.json_schema.schema_),
                               strict=bool(self.json_schema.strict))
        return None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extension (its field names, so vLLM clients work as they
    are): exactly one of ``json`` (a schema), ``json_object``, ``regex``, ``choice``, ``grammar``
    (Lark, llguidance's dialect)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid",
                              populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "json_object", "regex", "choice", "grammar")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("'structured_outputs' takes exactly one of 'json', 'json_object', "
                             "'regex', 'choice' or 'grammar'.")
        return self

    def to_grammar(self) -> GrammarSpec:
        if self.json_ is not None:
            schema = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
            return GrammarSpec(kind="json_schema", value=schema, strict=False)
        if self.regex is not None:
            return GrammarSpec(kind="regex", value=self.regex)
        if self.choice is not None:
            return GrammarSpec(kind="choice", value=json.dumps(self.choice, ensure_ascii=False))
        if self.grammar is not None:
            return GrammarSpec(kind="lark", value=self.grammar)
        return GrammarSpec(kind="json_object")


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    include_usage: bool | None = None


Probability = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingRequest(BaseModel):
    """What chat and legacy completions share: the model, the sampling fields with their
    checks, and the translation to the adapters' :class:`~adapters.base.SamplingParams`.

    Field order is validation order, and a 400 names the first invalid field: a route lists
    its inputs (``messages``, ``prompt``) in a base named after this one, whose fields pydantic
    puts first, so a missing input is named before a bad sampling value.
    """

    model_config = _REQUEST_CONFIG

    model: str
    frequency_penalty: Probability | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    presence_penalty: Probability | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = None
    #: OpenAI's cache-routing hint (it took that role over from ``user``); with ``--ray`` it
    #: keeps a conversation on one replica (``gateway/affinity.py``)
    prompt_cache_key: str | None = None
    response_format: ResponseFormat | None = None
    # extensions (vLLM / THUDM demo names)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    structured_outputs: StructuredOutputs | None = None

    #: The route's own values for fields a request leaves out; the model's configured
    #: defaults take precedence over them.
    route_defaults: ClassVar[SamplingParams] = SamplingParams()

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"At most {MAX_STOP} stop sequences are allowed.")
        if any(s == "" for s in stops):
            raise ValueError("Stop sequences must be non-empty strings.")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"At most {MAX_LOGIT_BIAS} logit_bias entries are allowed.")
        for key in v or {}:
            # 10 digits cover every vocabulary; the model checks the id is one of its own
            if not re.fullmatch(r"[0-9]{1,10}", key):
                raise ValueError(f"Logit bias keys must be token ids (integers); got "
                                 f"'{key[:20]}'.")
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> SamplingRequest:
        self.check_route_fields()  # first, so a 400 names the same field as before the merge
        if self.stream_options is not None and not self.stream:
            raise FieldError(
                "stream_options", "'stream_options' is only allowed when 'stream' is true."
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED - (self.choices - 1):
            raise FieldError("seed", f"'seed' must be between 0 and {MAX_SEED} - (n - 1) "
                             f"(choice i samples with seed + i).")
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise FieldError("structured_outputs", "Give either 'response_format' or "
                             "'structured_outputs', not both.")
        return self

    def to_grammar(self) -> GrammarSpec | None:
        """What the answer is constrained to (None: free text)."""
        if self.structured_outputs is not None:
            return self.structured_outputs.to_grammar()
        return self.response_format.to_grammar() if self.response_format else None

    def check_route_fields(self) -> None:
        """The route's own cross-field rules (raise :class:`FieldError`)."""

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> tuple[bool | None, int | None]:
        """``(logprobs, top_logprobs)`` as asked; None: not given."""
        return None, None

    def to_sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """The adapter's frozen params.  A field the request leaves out takes the model's
        configured default, else the route's, else the SamplingParams default (OpenAI's
        semantics)."""
        base = with_defaults(self.route_defaults, defaults)
        logprobs, top_logprobs = self.requested_logprobs()
        return SamplingParams(
            max_tokens=_given(self.requested_max_tokens(), base.max_tokens),
            temperature=_given(self.temperature, base.temperature),
            top_p=_given(self.top_p, base.top_p),
            top_k=_given(self.top_k, base.top_k),
            stop=base.stop if self.stop is None else (
                (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)),
            seed=_given(self.seed, base.seed),
            presence_penalty=_given(self.presence_penalty, base.presence_penalty),
            frequency_penalty=_given(self.frequency_penalty, base.frequency_penalty),
            repetition_penalty=_given(self.repetition_penalty, base.repetition_penalty),
            logit_bias=tuple(sorted((int(k), float(b)) for k, b in self.logit_bias.items()))
            if self.logit_bias else base.logit_bias,
            logprobs=_given(logprobs, base.logprobs),
            top_logprobs=_given(top_logprobs, base.top_logprobs),
        )


def with_defaults(route: SamplingParams, configured: Mapping[str, Any] | None) -> SamplingParams:
    """A route's defaults with the model's configured ones (settings) over them."""
    return replace(route, **(configured or {}))


def _given(value: T | None, default: T) -> T:
    return default if value is None else value


class _ChatInput(BaseModel):
    """The first fields of a chat request (see :class:`SamplingRequest`)."""

    model_config = _REQUEST_CONFIG

    messages: list[ChatMessage] = Field(min_length=1)


class ChatCompletionRequest(SamplingRequest, _ChatInput):
    """POST /v1/chat/completions."""

    audio: Any | None = None
    function_call: Any | None = None
    functions: Any | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    metadata: Any | None = None
    modalities: Any | None = None
    parallel_tool_calls: bool | None = None
    prediction: Prediction | None = None
    reasoning_effort: Any | None = None
    safety_identifier: Any | None = None
    service_tier: Any | None = None
    store: Any | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[ToolDefinition] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    verbosity: Any | None = None
    web_search_options: Any | None = None

    def check_route_fields(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise FieldError("tools", "Tool function names must be unique.")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise FieldError("tool_choice", f"Tool choice names function "
                             f"'{choice.function.name}', which is not in 'tools'.")
        if choice == "required" and not names:
            raise FieldError("tool_choice", "Tool choice 'required' needs 'tools'.")
        if self.tools and choice not in (None, "none") and self.to_grammar() is not None:
            raise FieldError("response_format", "A response format cannot be combined with "
                             "tools the model may call; send tool_choice 'none' or no tools.")
        if self.prediction is not None:
            self._check_prediction(bool(self.tools) and choice != "none")

    def _check_prediction(self, callable_tools: bool) -> None:
        """OpenAI's limits on Predicted Outputs (its guide's list), where they apply here."""
        if self.choices > 1:
            raise FieldError("n", "'n' greater than 1 is not supported with 'prediction'.")
        if self.logprobs:
            raise FieldError("logprobs", "'logprobs' is not supported with 'prediction'.")
        if callable_tools:
            raise FieldError("tools", "Tools the model may call are not supported with "
                             "'prediction'; send tool_choice 'none' or no tools.")

    # ---------------------------------------------------------------- translation

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> tuple[bool | None, int | None]:
        return self.logprobs, self.top_logprobs

    def to_messages(self) -> tuple[Message, ...]:
        return to_messages(self.messages)

    def to_tools(self) -> tuple[Tool, ...]:
        """Offered tools; none when ``tool_choice`` is ``"none"``."""
        return to_tools(self.tools, self.tool_choice)

    def to_prediction(self) -> str | None:
        return self.prediction.text() if self.prediction is not None else None

    def to_tool_choice(self) -> ToolChoice:
        parallel = self.parallel_tool_calls is not False  # OpenAI's default: true
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return ToolChoice(mode="function", name=choice.function.name, parallel=parallel)
        if choice == "required":
            return ToolChoice(mode="required", parallel=parallel)
        return ToolChoice(parallel=parallel)


def to_messages(messages: list[ChatMessage]) -> tuple[Message, ...]:
    """Chat messages as the adapters take them (text parts joined)."""
    return tuple(
        Message(role=m.role, content=m.text(), name=m.name, tool_calls=tuple(
            ToolCall(name=c.function.name, arguments=c.function.arguments, id=c.id or "")
            for c in m.tool_calls or ()), tool_call_id=m.tool_call_id)
        for m in messages
    )


def to_tools(tools: list[ToolDefinition] | None,
             tool_choice: str | NamedToolChoice | None) -> tuple[Tool, ...]:
    """Offered tools; none when ``tool_choice`` is ``"none"``."""
    if not tools or tool_choice == "none":
        return ()
    return tuple(
        Tool(name=t.function.name, description=t.function.description or "",
             parameters=t.function.parameters or {}, strict=bool(t.function.strict))
        for t in tools
    )


# --------------------------------------------------------------------------- legacy completions

#: OpenAI's default for ``max_tokens`` on /v1/completions (chat has none).
COMPLETION_MAX_TOKENS = 16
MAX_LEGACY_LOGPROBS = 5


class _CompletionInput(BaseModel):
    """The first fields of a legacy completion request (see :class:`SamplingRequest`)."""

    model_config = _REQUEST_CONFIG

    model: str  # before the prompt, as OpenAI lists them
    prompt: str | list[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("'prompt' must not be an empty list.")
            if len(v) > MAX_PROMPTS:
                raise ValueError(f"At most {MAX_PROMPTS} prompts are allowed in one request.")
            if any(isinstance(item, int | list) for item in v):
                raise ValueError("Token-id prompts are not supported by this server (the "
                                 "prompt goes through the model's chat format); send text.")
        return v


class CompletionRequest(SamplingRequest, _CompletionInput):
    """POST /v1/completions (OpenAI's legacy completions).

    The prompt is fed to the chat model as ONE user turn through its chat format.  ``echo``
    with ``logprobs`` also scores the prompt's own tokens (those of its text inside the chat
    format); ``max_tokens`` 0 (only with ``echo``) scores it without generating.  Not supported
    (400): token-id prompts, ``suffix``, ``best_of`` other than ``n``.  ``max_tokens`` falls
    back to the model default, then OpenAI's 16.
    """

    route_defaults: ClassVar[SamplingParams] = SamplingParams(max_tokens=COMPLETION_MAX_TOKENS)

    max_tokens: int | None = Field(default=None, ge=0)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    suffix: str | None = None

    def check_route_fields(self) -> None:
        if self.suffix:
            raise FieldError("suffix", "'suffix' (insertion) is not supported by ChatGLM models.")
        if self.best_of is not None and self.best_of != self.choices:
            raise FieldError("best_of", "'best_of' must equal 'n' (no server-side ranking).")
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "'max_tokens' 0 is only supported together with "
                             "'echo' (it scores the prompt without generating).")

    def to_sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        params = super().to_sampling_params(defaults)
        # A scored echo lists every id the model read or produced, the one that ends the
        # answer too (vLLM's lists; lm-eval drops that last entry as the generated token).
        scored = bool(self.echo) and self.logprobs is not None
        return replace(params, prompt_logprobs=scored, ending_logprobs=scored)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requested_logprobs(self) -> tuple[bool | None, int | None]:
        # The legacy ``logprobs`` is the number of alternatives; any number turns them on.
        return (True if self.logprobs is not None else None), self.logprobs


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per token (with ``echo``, the
    prompt's first: its first token has ``null`` logprob and ``null`` top_logprobs)."""

    model_config = _RESPONSE_CONFIG

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    model_config = _RESPONSE_CONFIG

    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class _OmitsNulls(BaseModel):
    """A response object from which OpenAI leaves the fields in ``omitted_if_null`` out,
    rather than sending null, when they have no value."""

    model_config = _RESPONSE_CONFIG
    omitted_if_null: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in self.omitted_if_null:
            if data.get(key) is None:
                data.pop(key, None)
        usage = data.get("usage")
        # OpenAI's usage has completion_tokens_details only where there is something to detail
        # (here: a prediction was given)
        if isinstance(usage, dict) and usage.get("completion_tokens_details", 0) is None:
            del usage["completion_tokens_details"]
        return data


class Completion(_OmitsNulls):
    """A legacy completion; also each streamed chunk (OpenAI uses one shape for both)."""

    omitted_if_null = ("usage",)  # most stream chunks have none

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


def legacy_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- ChatGLM's POST /


class LegacyMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "observation"]
    content: str


class ChatGLMRequest(BaseModel):
    """THUDM's ``api.py`` body.  ``history`` holds ``[query, response]`` pairs (ChatGLM-6B/2) or
    ``{"role", "content"}`` messages (ChatGLM3's ``chat()`` history).  ``model`` is ours."""

    model_config = ConfigDict(allow_inf_nan=False, extra="allow")

    prompt: str
    history: list[Annotated[list[str], Field(min_length=2, max_length=2)]] | list[
        LegacyMessage] | None = None
    max_length: int | None = None
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    model: str | None = None

    def to_sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """api.py's ``x if x else default``: 0 or null takes the model's configured default,
        else api.py's own."""
        base = with_defaults(CHATGLM_API_DEFAULTS, defaults)
        return replace(base, temperature=self.temperature or base.temperature,
                       top_p=self.top_p or base.top_p)


#: THUDM api.py's sampling defaults (``top_p if top_p else 0.7``, ...).
CHATGLM_API_DEFAULTS = SamplingParams(top_p=0.7, temperature=0.95)


class ChatGLMResponse(BaseModel):
    model_config = _RESPONSE_CONFIG

    response: str
    history: list[Any]
    status: int
    time: str


# --------------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ChoiceLogprobs(BaseModel):
    model_config = _RESPONSE_CONFIG

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ResponseFunction(BaseModel):
    model_config = _RESPONSE_CONFIG

    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    model_config = _RESPONSE_CONFIG

    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class ChunkFunction(_OmitsNulls):
    omitted_if_null: ClassVar[tuple[str, ...]] = ("name",)

    name: str | None = None
    arguments: str


class ChunkToolCall(_OmitsNulls):
    """A tool call's piece in a stream: the first carries ``id``, ``type`` and the function's
    ``name`` (``arguments`` ""), the next ones only more ``arguments`` (OpenAI's shape)."""

    omitted_if_null: ClassVar[tuple[str, ...]] = ("id", "type")

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class AssistantMessage(_OmitsNulls):
    omitted_if_null = ("tool_calls",)

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class Choice(BaseModel):
    model_config = _RESPONSE_CONFIG

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(_OmitsNulls):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChoiceDelta(_OmitsNulls):
    """A chunk's delta; unset fields are left out, like OpenAI's ``{}`` finish delta."""

    omitted_if_null = ("role", "content", "tool_calls")

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(BaseModel):
    model_config = _RESPONSE_CONFIG

    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_OmitsNulls):
    omitted_if_null = ("usage",)  # only the last chunk, with include_usage, has one

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, the answer to every failed request."""

    error: ErrorDetail


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


# --------------------------------------------------------------------------- token counting


class TokenizeRequest(BaseModel):
    """POST /tokenize, vLLM's fields: ``prompt`` (+ ``add_special_tokens``) or ``messages``
    (+ ``tools``, ``tool_choice``: a chat request's body counts as it is).

    ``messages`` are tokenized exactly as a chat completion's prompt (the family's format, the
    server's system policy, the tools' prompt).  ``prompt`` with ``add_special_tokens`` (the
    default) is what ``/v1/completions`` feeds for it (one user turn in the chat format);
    without, the text's own ids.  ChatGLM's prompt always ends with the assistant's turn, so
    ``add_generation_prompt: false`` and ``continue_final_message: true`` are 400s, as are
    ``chat_template`` and ``return_token_strs``.
    """

    model_config = _REQUEST_CONFIG

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template: Any | None = None
    return_token_strs: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "Give either 'prompt' or 'messages'.")
        if self.add_generation_prompt is False:
            raise FieldError("add_generation_prompt", "ChatGLM's prompt always ends with the "
                             "assistant's turn; 'add_generation_prompt' cannot be false.")
        for field in ("continue_final_message", "return_token_strs"):
            if getattr(self, field):
                raise FieldError(field, f"'{field}' is not supported by this server.")
        if self.chat_template is not None:
            raise FieldError("chat_template", "ChatGLM's prompt format is the family's own; "
                             "'chat_template' is not supported.")
        return self

    def to_messages(self) -> tuple[Message, ...]:
        if self.messages is not None:
            return to_messages(self.messages)
        return (Message(role="user", content=self.prompt or ""),)

    def to_tools(self) -> tuple[Tool, ...]:
        return to_tools(self.tools, self.tool_choice)

    @property
    def chat_format(self) -> bool:
        """Whether the ids are a whole prompt (else the prompt text's own ids)."""
        return self.messages is not None or self.add_special_tokens is not False


class TokenizeResponse(BaseModel):
    model_config = _RESPONSE_CONFIG

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's fields)."""

    model_config = _REQUEST_CONFIG

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    model_config = _RESPONSE_CONFIG

    prompt: str
