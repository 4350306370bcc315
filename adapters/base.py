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
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "developer", "user", "assistant", "observation", "tool"]
#: How a generation ended, as OpenAI reports it to the client.
FinishReason = Literal["stop", "length", "tool_calls"]
#: How a generation ended, including the two ways that give the client an error instead of an
#: answer (the gateway maps them to a status or an in-band error event).
Outcome = Literal["stop", "length", "tool_calls", "cancelled", "error"]
#: OpenAI reports tokens a sampler masked with this logprob (JSON has no -Infinity).
MIN_LOGPROB = -9999.0


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
class ToolCallPart:
    """A tool call while it is being generated (streaming): ``index`` is the call's place in
    the answer; its first part carries the ``name``, later ones more ``arguments`` text.  The
    parts of a call concatenate to the ``arguments`` of the finished :class:`ToolCall`."""

    index: int
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class Tool:
    """A function the model may call: OpenAI's ``tools[].function``.  ``parameters`` is a JSON
    schema; a forced call's arguments always follow it (``strict`` only changes how unknown
    schema keywords are treated: an error rather than ignored)."""

    name: str
    description: str = ""
    parameters: dict[str, object] = field(default_factory=dict)
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    """OpenAI's ``tool_choice`` and ``parallel_tool_calls``.  ``mode``: ``"auto"`` (the model
    decides), ``"required"`` (at least one call), ``"function"`` (a call to ``name``)."""

    mode: Literal["auto", "required", "function"] = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode != "auto"


GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]


@dataclass(frozen=True)
class GrammarSpec:
    """What an answer is constrained to (constrained decoding).

    ``value``: the schema as JSON text (``json_schema``), ignored for ``json_object`` (any JSON
    object), a regex, a JSON list of strings (``choice``), or Lark source in llguidance's
    dialect (``lark``).  ``whitespace_flexible`` lets JSON put whitespace between tokens (compact
    otherwise, as OpenAI's answers look); ``strict``: unknown JSON-schema keywords are an error.
    """

    kind: GrammarKind
    value: str = ""
    whitespace_flexible: bool = False
    strict: bool = True


@dataclass(frozen=True)
class Message:
    """One chat message. ``content`` is plain text (the gateway joins text parts)."""

    role: Role
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    #: a ``tool`` message: the id of the call it answers
    tool_call_id: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, already validated by the gateway.

    ``max_tokens=None`` means "up to the context limit"; :meth:`ChatModel.prepare` resolves it
    to a number once, in the returned :class:`Prompt`'s params.  ``temperature == 0`` means greedy.
    ``logit_bias`` maps token id -> additive bias.  ``top_logprobs`` only matters when
    ``logprobs`` or ``prompt_logprobs`` is true.  ``prompt_logprobs``: also score the prompt's
    text (legacy completions' ``echo``; see :class:`PromptLogprobs`).  ``max_tokens=0`` (only
    asked explicitly) reads the prompt and generates nothing.
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
    prompt_logprobs: bool = False
    #: with ``logprobs``, also report the token that ends the answer without adding text (a
    #: stop id, ChatGLM3's dropped last token): a scored echo lists every id, as vLLM's does
    #: (lm-evaluation-harness drops that last entry as the generated one)
    ending_logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ChatRequest:
    """What a route asks of a model: a conversation and how to answer it."""

    messages: tuple[Message, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    #: functions the model may call (none: ``tool_choice`` "none" or no tools offered)
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    #: ``response_format`` / ``structured_outputs``: what the answer must parse as
    grammar: GrammarSpec | None = None
    #: THUDM ``chat()``'s ``max_length``: prompt plus completion tokens (ChatGLM's ``POST /``
    #: passes it); None: only the context window bounds the two together
    max_length: int | None = None
    #: generations the whole HTTP request will start (prompts x ``n``): admitted together or
    #: refused together (429 when the model is full, 400 when they could never fit)
    generations: int = 1
    #: OpenAI's Predicted Outputs: the answer the client expects (an edited file, say); a draft
    #: for speculative decoding, it never changes what is generated.  None: no prediction
    prediction: str | None = None

    def completion_budget(self, prompt_tokens: int, context_length: int) -> int:
        """How many tokens may follow a prompt of ``prompt_tokens``: what was asked (None: up
        to the limit), within the context window and ``max_length``.  The one place this is
        decided; too little room is a :class:`ContextLengthExceeded` (400)."""
        max_tokens, max_length = self.params.max_tokens, self.max_length
        if max_length is not None and max_length - prompt_tokens < 1:
            raise InvalidRequest(
                f"max_length ({max_length}) must exceed the prompt's {prompt_tokens} tokens (it "
                "counts the prompt and the answer).", param="max_length",
                code="context_length_exceeded")
        limit = context_length if max_length is None else min(max_length, context_length)
        room = limit - prompt_tokens
        if max_tokens is None:
            wanted = room
        elif max_length is not None:  # api.py's max_length caps the answer, a default too
            wanted = min(max_tokens, room)
        else:
            wanted = max_tokens
        least = 0 if max_tokens == 0 else 1  # 0 only when asked: score the prompt, generate none
        if wanted < least or wanted > room:
            raise ContextLengthExceeded(prompt_tokens, max(wanted, 1), context_length)
        return wanted


@dataclass(frozen=True)
class Prompt:
    """A prepared request: the exact ids fed to the model and the resolved sampling settings
    (``params.max_tokens`` is the number of tokens that may follow, never None)."""

    token_ids: tuple[int, ...]
    params: SamplingParams
    text: str = ""  # the prompt as a string, for logs and debugging only
    #: the request offered tools and the model can call them: answers may be tool calls
    tools: bool = False
    #: every generated token is masked to what this grammar allows (a response format, or the
    #: family's tool-call format when a call is forced)
    grammar: GrammarSpec | None = None
    #: with ``params.prompt_logprobs``: the ``[start, end)`` of ``token_ids`` that are scored,
    #: the tokens of the user's text inside the chat format (the template's are not reported)
    scored: tuple[int, int] | None = None
    #: the conversation's routing key, set by the gateway from the client's own name for it
    #: (an ``X-Session-Id`` header, ``prompt_cache_key``, ``user``; a digest, never the name):
    #: with Ray Serve, prompts with the same key go to the same replica, which holds the
    #: conversation's prefix cache.  Empty: routed by ``token_ids`` alone.  Generation ignores it.
    affinity: str = ""
    #: the ids of the request's predicted answer (``ChatRequest.prediction``): the engine
    #: drafts from them and reports how much of them the answer followed
    prediction_ids: tuple[int, ...] | None = None

    @property
    def max_tokens(self) -> int:
        assert self.params.max_tokens is not None  # prepare() resolves it
        return self.params.max_tokens

    def choices(self, n: int) -> list[Prompt]:
        """One prompt per choice of an ``n > 1`` request: with a seed, choice ``i`` samples with
        ``seed + i`` so the choices differ yet the whole request stays reproducible."""
        if n == 1 or self.params.seed is None:
            return [self] * n
        seed = self.params.seed
        return [replace(self, params=replace(self.params, seed=seed + i)) for i in range(n)]


@dataclass(frozen=True)
class TopLogprob:
    """An alternative token of OpenAI's ``top_logprobs``; ``logprob`` is finite (at least
    :data:`MIN_LOGPROB`), as OpenAI reports it."""

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
class PromptLogprobs:
    """The logprobs of a prompt's scored tokens (legacy completions' ``echo`` with
    ``logprobs``), each given every token fed before it.  The first scored token has no entry,
    only its text and bytes: OpenAI reports ``null`` for it, as it does for a prompt's first
    token (nothing scored comes before it)."""

    first: str
    first_bytes: tuple[int, ...]
    following: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptTokensDetails:
    """OpenAI's ``usage.prompt_tokens_details``: ``cached_tokens`` of the prompt came from the
    prefix cache (their KV was reused, not computed)."""

    cached_tokens: int = 0


@dataclass(frozen=True)
class CompletionTokensDetails:
    """OpenAI's ``usage.completion_tokens_details``, reported when a request gave a
    prediction.  ``accepted_prediction_tokens``: prediction tokens that appear in the answer,
    in order (``adapters/runtime/speculative.py``, ``prediction_usage``);
    ``rejected_prediction_tokens``: the prediction's other tokens.  No reasoning or audio."""

    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    reasoning_tokens: int = 0
    audio_tokens: int = 0


@dataclass(frozen=True)
class Usage:
    """Token counts in OpenAI's shape (the wire schema serialises this class as it is).
    ``total_tokens`` is always the sum of the other two, whatever is passed."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = field(default_factory=PromptTokensDetails)
    #: only with a prediction (left out of the wire format when None)
    completion_tokens_details: CompletionTokensDetails | None = None

    def __post_init__(self) -> None:
        # a plain field (not a property) so that it is part of the serialised shape
        object.__setattr__(self, "total_tokens", self.prompt_tokens + self.completion_tokens)


@dataclass(frozen=True)
class Delta:
    """A piece of a generation.

    ``text`` is new text only (never cumulative).  The last Delta of a generation carries
    ``finish_reason`` and ``usage``; it may also carry final text.
    """

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: Outcome | None = None
    usage: Usage | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # only on the last Delta, with finish "tool_calls"
    #: tool calls as they are generated, where the family's format allows it (else only the
    #: finished ``tool_calls`` come, at the end)
    tool_call_parts: tuple[ToolCallPart, ...] = ()
    #: the scored prompt (``prompt_logprobs``), on the generation's first Delta only; None when
    #: the prompt is empty or was not asked to be scored
    prompt_logprobs: PromptLogprobs | None = None
    #: where the generation runs, on its first Delta: the Ray Serve replica's id (the
    #: ``X-Replica`` header); empty in a single-process server
    replica: str = ""


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
    ``tokenize``, ``encode`` and ``decode`` count and show tokens (``/tokenize``,
    ``/detokenize``); they start nothing.
    """

    info: ModelInfo

    def prepare(self, request: ChatRequest) -> Prompt: ...

    def tokenize(self, request: ChatRequest) -> tuple[int, ...]:
        """The ids :meth:`prepare` would feed for ``request`` (the same conversation mapping,
        system policy and tools), without the admission and context-length checks; may raise
        :class:`InvalidRequest` for a conversation the model cannot take."""
        ...

    def encode(self, text: str) -> tuple[int, ...]:
        """The ids of ``text`` alone (user text: never a control id, no prompt format)."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Ids back to text as the family's reference tokenizer shows them; an id outside
        the vocabulary is an :class:`InvalidRequest`."""
        ...

    def generate(self, prompt: Prompt) -> AsyncIterator[Delta]: ...

    def status(self) -> dict[str, int]: ...

    def close(self) -> None: ...
