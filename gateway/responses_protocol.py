"""OpenAI's Responses API (``POST /v1/responses``) wire format, served statelessly.

The chat-completion schema is in ``gateway/protocol.py``; this file only adds what the Responses
API names differently, and reuses its sampling base (:class:`~gateway.protocol.SamplingRequest`),
so the two routes validate the shared fields the same way.  A request becomes the same
:class:`~adapters.base.ChatRequest` a chat completion makes:

* ``instructions`` is a system message before ``input``; ``input`` is a string (one user
  message) or a list of items: messages (``input_text``/``output_text`` parts), ``function_call``
  items (an earlier call; consecutive ones and the assistant text before them are one assistant
  message) and ``function_call_output`` items (a ``tool`` message answering ``call_id``);
* ``tools`` (function tools, flat as the Responses API writes them) and ``tool_choice`` take the
  chat path's tool calling, forced calls included; ``text.format`` is ``response_format``;
* ``max_output_tokens`` is ``max_tokens``.

Nothing is stored (the response says ``store: false``): ``previous_response_id``,
``conversation``, ``background`` and stored ``prompt`` templates are a 400 saying so.  The
sampling extensions of the chat route (``top_k``, ``seed``, ``stop``...) are accepted too.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from adapters.base import GrammarSpec, Message, TokenLogprob, Tool, ToolCall, ToolChoice
from gateway.errors import FieldError
from gateway.protocol import MAX_TOP_LOGPROBS, SamplingRequest, _OmitsNulls

_REQUEST_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
_RESPONSE_CONFIG = ConfigDict(extra="forbid")

#: ``include`` value that asks for the answer's token logprobs (OpenAI's name)
INCLUDE_LOGPROBS = "message.output_text.logprobs"
#: what a state-keeping field is told: nothing is kept between requests
STATELESS = ("This server keeps no responses (every response has store=false), so "
             "'{field}' cannot be used: send the whole conversation in 'input'.")


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def function_call_id() -> str:
    return f"fc_{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- request


class ContentPart(BaseModel):
    """A text part of an input message: ``input_text`` (what a user or system wrote),
    ``output_text`` or ``refusal`` (an earlier answer sent back).  Images, files and audio are a
    400: ChatGLM reads text only."""

    model_config = _REQUEST_CONFIG

    type: str
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type not in ("input_text", "output_text", "refusal"):
            raise ValueError(f"Content part type '{self.type}' is not supported; only "
                             "'input_text' (and 'output_text' in earlier answers) are.")
        if (self.refusal if self.type == "refusal" else self.text) is None:
            field = "refusal" if self.type == "refusal" else "text"
            raise ValueError(f"An '{self.type}' content part needs a '{field}' string.")
        return self

    def value(self) -> str:
        return (self.refusal if self.type == "refusal" else self.text) or ""


def _joined(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else "\n".join(p.value() for p in content)


class MessageItem(BaseModel):
    """A message (``type`` may be left out, as OpenAI's "easy input message" does)."""

    model_config = _REQUEST_CONFIG

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(BaseModel):
    """A function call of an earlier answer, sent back with its result."""

    model_config = _REQUEST_CONFIG

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """The result of the call ``call_id``."""

    model_config = _REQUEST_CONFIG

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]


class UnsupportedItem(BaseModel):
    """Any other item type (reasoning, item_reference, built-in tool calls): a clear 400."""

    model_config = _REQUEST_CONFIG

    type: str

    @model_validator(mode="after")
    def _refuse(self) -> UnsupportedItem:
        if self.type == "item_reference":
            raise ValueError(STATELESS.format(field="item_reference"))
        raise ValueError(f"Input item type '{self.type}' is not supported; use 'message', "
                         "'function_call' and 'function_call_output' items.")


#: item type -> the tag of its schema (capitalised: a 400's ``param`` leaves such tags out)
_ITEM_TAGS = {"message": "Message", "function_call": "FunctionCall",
              "function_call_output": "FunctionCallOutput"}


def _item_kind(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else "message"
    return _ITEM_TAGS.get(kind, "Other")


InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")]
    | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")]
    | Annotated[UnsupportedItem, Tag("Other")],
    Discriminator(_item_kind),
]


class FunctionTool(BaseModel):
    """``{"type": "function", "name", "description", "parameters", "strict"}``; the built-in
    tools (web search, file search, computer use...) are a 400."""

    model_config = _REQUEST_CONFIG

    type: str
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "function":
            raise ValueError(f"Tool type '{data.get('type')}' is not supported; only 'function' "
                             "tools are.")
        return data


class FunctionToolChoice(BaseModel):
    """``{"type": "function", "name": ...}``: a call to exactly that function."""

    model_config = _REQUEST_CONFIG

    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(BaseModel):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (flat: ``name``,
    ``schema``, ``strict`` beside ``type``)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow",
                              populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("A 'json_schema' text format needs 'schema'.")
        return self

    def to_grammar(self) -> GrammarSpec | None:
        if self.type == "json_object":
            return GrammarSpec(kind="json_object")
        if self.type == "json_schema":
            return GrammarSpec(kind="json_schema", value=json.dumps(self.schema_),
                               strict=bool(self.strict))
        return None


class TextConfig(BaseModel):
    model_config = _REQUEST_CONFIG

    format: TextFormat | None = None
    verbosity: Any | None = None


class _ResponsesInput(BaseModel):
    """The first fields of a Responses request (see :class:`SamplingRequest`)."""

    model_config = _REQUEST_CONFIG

    input: str | Annotated[list[InputItem], Field(min_length=1)]


class ResponsesRequest(SamplingRequest, _ResponsesInput):
    """POST /v1/responses."""

    background: bool | None = None
    conversation: Any | None = None
    include: list[str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: Any | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    prompt: Any | None = None
    reasoning: Any | None = None
    safety_identifier: Any | None = None
    service_tier: Any | None = None
    store: bool | None = None
    text: TextConfig | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    tools: list[FunctionTool] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    truncation: Any | None = None

    def check_route_fields(self) -> None:
        for field in ("previous_response_id", "conversation", "prompt"):
            if getattr(self, field) is not None:
                raise FieldError(field, STATELESS.format(field=field))
        if self.background:
            raise FieldError("background", "Background responses need stored state, which "
                             "this server does not keep; send the request without it.")
        if self.choices != 1:
            raise FieldError("n", "A response has one answer; 'n' must be 1.")
        if self.response_format is not None:
            raise FieldError("response_format", "The Responses API takes the answer's format "
                             "in 'text.format'.")
        names = [t.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise FieldError("tools", "Tool function names must be unique.")
        choice = self.tool_choice
        if isinstance(choice, FunctionToolChoice) and choice.name not in names:
            raise FieldError("tool_choice", f"Tool choice names function '{choice.name}', "
                             "which is not in 'tools'.")
        if choice == "required" and not names:
            raise FieldError("tool_choice", "Tool choice 'required' needs 'tools'.")
        if self.tools and choice != "none" and self.to_grammar() is not None:
            raise FieldError("text", "A text format cannot be combined with tools the model "
                             "may call; send tool_choice 'none' or no tools.")

    # ---------------------------------------------------------------- translation

    def to_grammar(self) -> GrammarSpec | None:
        if self.structured_outputs is not None:
            return self.structured_outputs.to_grammar()
        text_format = self.text.format if self.text else None
        return text_format.to_grammar() if text_format else None

    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens or self.max_tokens

    def requested_logprobs(self) -> tuple[bool | None, int | None]:
        if INCLUDE_LOGPROBS in (self.include or ()):
            return True, self.top_logprobs or 0
        return None, None

    def to_messages(self) -> tuple[Message, ...]:
        """``instructions`` then ``input`` as chat messages (see the module docstring)."""
        messages: list[Message] = []
        if self.instructions:
            messages.append(Message(role="system", content=self.instructions))
        items = ([MessageItem(role="user", content=self.input)]
                 if isinstance(self.input, str) else self.input)
        for item in items:
            if isinstance(item, MessageItem):
                messages.append(Message(role=item.role, content=_joined(item.content)))
            elif isinstance(item, FunctionCallItem):
                call = ToolCall(name=item.name, arguments=item.arguments, id=item.call_id)
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant":
                    messages[-1] = replace(last, tool_calls=(*last.tool_calls, call))
                else:
                    messages.append(Message(role="assistant", content="", tool_calls=(call,)))
            elif isinstance(item, FunctionCallOutputItem):
                messages.append(Message(role="tool", content=_joined(item.output),
                                        tool_call_id=item.call_id))
        return tuple(messages)

    def to_tools(self) -> tuple[Tool, ...]:
        """Offered tools; none when ``tool_choice`` is ``"none"``."""
        if not self.tools or self.tool_choice == "none":
            return ()
        return tuple(Tool(name=t.name, description=t.description or "",
                          parameters=t.parameters or {}, strict=bool(t.strict))
                     for t in self.tools)

    def to_tool_choice(self) -> ToolChoice:
        parallel = self.parallel_tool_calls is not False  # OpenAI's default: true
        choice = self.tool_choice
        if isinstance(choice, FunctionToolChoice):
            return ToolChoice(mode="function", name=choice.name, parallel=parallel)
        if choice == "required":
            return ToolChoice(mode="required", parallel=parallel)
        return ToolChoice(parallel=parallel)

    def echoed_tool_choice(self) -> str | dict[str, str]:
        choice = self.tool_choice
        if isinstance(choice, FunctionToolChoice):
            return {"type": "function", "name": choice.name}
        return choice or "auto"

    def echoed_text(self) -> dict[str, Any]:
        text_format = self.text.format if self.text and self.text.format else None
        if text_format is None:
            return {"format": {"type": "text"}}
        return {"format": text_format.model_dump(mode="json", by_alias=True, exclude_none=True)}


# --------------------------------------------------------------------------- response


class InputTokensDetails(BaseModel):
    model_config = _RESPONSE_CONFIG

    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    model_config = _RESPONSE_CONFIG

    reasoning_tokens: int = 0  # ChatGLM does not reason apart from its answer


class ResponseUsage(BaseModel):
    """The Responses API's usage: the chat route's counts under its names."""

    model_config = _RESPONSE_CONFIG

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class OutputText(BaseModel):
    model_config = _RESPONSE_CONFIG

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[TokenLogprob] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    model_config = _RESPONSE_CONFIG

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCall(BaseModel):
    model_config = _RESPONSE_CONFIG

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionCall


class IncompleteDetails(BaseModel):
    model_config = _RESPONSE_CONFIG

    reason: Literal["max_output_tokens"]


class Response(BaseModel):
    """A response object: the non-streamed answer, and what the stream's lifecycle events
    (``response.created`` ... ``response.completed``) carry."""

    model_config = _RESPONSE_CONFIG

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    background: bool = False
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: None = None
    store: Literal[False] = False
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, str]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None
    user: str | None = None


class StreamEvent(_OmitsNulls):
    """One event of a streamed response; each type has the fields OpenAI gives it (the others
    are left out), and every one a ``sequence_number`` counting from 0."""

    omitted_if_null = ("response", "output_index", "item", "item_id", "content_index", "part",
                       "delta", "text", "arguments", "logprobs")

    type: str
    sequence_number: int
    response: Response | None = None
    output_index: int | None = None
    item_id: str | None = None
    content_index: int | None = None
    item: OutputItem | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    arguments: str | None = None
    logprobs: list[TokenLogprob] | None = None
