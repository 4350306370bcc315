"""Adapter Deltas -> the Responses API's stream events, or one Response object.

The events, in OpenAI's order (``gateway/sse.py`` writes each as ``event: <type>`` + ``data:``):

1. ``response.created`` and ``response.in_progress`` (the response, ``in_progress``, no output);
2. per output item, in order: a message (``response.output_item.added``,
   ``response.content_part.added``, ``response.output_text.delta``...,
   ``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``) or a function call
   (``response.output_item.added``, ``response.function_call_arguments.delta``...,
   ``response.function_call_arguments.done``, ``response.output_item.done``); an item is done
   when the next one starts or the answer ends;
3. ``response.completed`` with the whole response and its usage, or ``response.incomplete``
   when ``max_output_tokens`` cut the answer (OpenAI's event for it).

Calls come as they are generated where the family's format allows it (their parts), else whole
at the end; an answer with neither text nor calls is one empty message, as OpenAI sends it.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from adapters.base import TokenLogprob, ToolCall, ToolCallPart, Usage
from gateway import responses_protocol as r
from gateway.chat_stream import ARGUMENT_PIECE
from gateway.generation import CompletionMeta, Deltas, UsageSum, finish_reason
from gateway.protocol import tool_call_id


@dataclass(frozen=True)
class ResponsePlan:
    """What every Response of one request repeats: its meta and the request's settings, echoed
    as OpenAI echoes them (``temperature``/``top_p`` as sampled, defaults resolved)."""

    meta: CompletionMeta
    request: r.ResponsesRequest
    temperature: float
    top_p: float

    def response(self, status: str, output: list[r.OutputItem] | None = None,
                 usage: Usage | None = None) -> r.Response:
        body = self.request
        return r.Response(
            id=self.meta.id, created_at=self.meta.created, status=status,  # type: ignore[arg-type]
            incomplete_details=r.IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete" else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            metadata=body.metadata or {}, model=self.meta.model, output=output or [],
            parallel_tool_calls=body.parallel_tool_calls is not False,
            temperature=self.temperature, text=body.echoed_text(),
            tool_choice=body.echoed_tool_choice(),
            tools=[t.model_dump(mode="json", exclude_none=True) for t in body.tools or ()],
            top_p=self.top_p, usage=wire_usage(usage) if usage is not None else None,
            user=body.user,
        )


def wire_usage(usage: Usage) -> r.ResponseUsage:
    return r.ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=r.InputTokensDetails(
            cached_tokens=usage.prompt_tokens_details.cached_tokens),
        output_tokens=usage.completion_tokens,
        output_tokens_details=r.OutputTokensDetails(),
        total_tokens=usage.total_tokens,
    )


Event = dict[str, Any]  # a StreamEvent's fields but its sequence number


@dataclass
class _Message:
    index: int
    id: str = field(default_factory=r.message_id)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def item(self, status: r.ItemStatus) -> r.OutputMessage:
        return r.OutputMessage(id=self.id, status=status, content=[self.part()])

    def part(self) -> r.OutputText:
        return r.OutputText(text=self.text, logprobs=list(self.logprobs))


@dataclass
class _Call:
    index: int
    name: str
    call_id: str
    id: str = field(default_factory=r.function_call_id)
    arguments: str = ""

    def item(self, status: r.ItemStatus) -> r.FunctionCall:
        return r.FunctionCall(id=self.id, call_id=self.call_id, name=self.name,
                              arguments=self.arguments, status=status)


class _Output:
    """The output items of one answer as its Deltas arrive; each method returns the events
    that step makes (without sequence numbers)."""

    def __init__(self) -> None:
        self.items: list[r.OutputItem] = []  # done, in output order
        self.open: _Message | _Call | None = None
        self.calls_by_part: dict[int, _Call] = {}

    def text(self, text: str, logprobs: tuple[TokenLogprob, ...]) -> list[Event]:
        events = []
        message = self.open
        if not isinstance(message, _Message):
            events += self.close()
            message = self.open = _Message(len(self.items))
            events += [
                {"type": "response.output_item.added", "output_index": message.index,
                 "item": r.OutputMessage(id=message.id, status="in_progress", content=[])},
                {"type": "response.content_part.added", "output_index": message.index,
                 "item_id": message.id, "content_index": 0, "part": r.OutputText(text="")},
            ]
        if not (text or logprobs):  # an empty answer's message: opened, no delta
            return events
        message.text += text
        message.logprobs += logprobs
        return events + [{"type": "response.output_text.delta", "output_index": message.index,
                          "item_id": message.id, "content_index": 0, "delta": text,
                          "logprobs": list(logprobs)}]

    def call_part(self, part: ToolCallPart) -> list[Event]:
        """A call's part as generated: the one with the name opens the call."""
        events = []
        call = self.calls_by_part.get(part.index)
        if call is None or part.name:
            events += self.close()
            call = self.open = self.calls_by_part[part.index] = _Call(
                len(self.items), part.name, tool_call_id())
            events.append({"type": "response.output_item.added", "output_index": call.index,
                           "item": call.item("in_progress")})
        if part.arguments:
            call.arguments += part.arguments
            events.append({"type": "response.function_call_arguments.delta",
                           "output_index": call.index, "item_id": call.id,
                           "delta": part.arguments})
        return events

    def whole_call(self, tool: ToolCall) -> list[Event]:
        """A call known only when the answer ended: opened, its arguments in pieces."""
        events = self.close()
        call = self.open = _Call(len(self.items), tool.name, tool.id or tool_call_id())
        events.append({"type": "response.output_item.added", "output_index": call.index,
                       "item": call.item("in_progress")})
        for i in range(0, len(tool.arguments), ARGUMENT_PIECE):
            events += [{"type": "response.function_call_arguments.delta",
                        "output_index": call.index, "item_id": call.id,
                        "delta": tool.arguments[i:i + ARGUMENT_PIECE]}]
        call.arguments = tool.arguments
        return events

    def close(self, status: r.ItemStatus = "completed") -> list[Event]:
        """The done events of the open item, if any."""
        item, self.open = self.open, None
        if item is None:
            return []
        if isinstance(item, _Message):
            done = item.item(status)
            events = [
                {"type": "response.output_text.done", "output_index": item.index,
                 "item_id": item.id, "content_index": 0, "text": item.text,
                 "logprobs": list(item.logprobs)},
                {"type": "response.content_part.done", "output_index": item.index,
                 "item_id": item.id, "content_index": 0, "part": item.part()},
            ]
        else:
            done = item.item("completed")  # type: ignore[assignment]
            events = [{"type": "response.function_call_arguments.done",
                       "output_index": item.index, "item_id": item.id,
                       "arguments": item.arguments}]
        self.items.append(done)
        return events + [{"type": "response.output_item.done", "output_index": item.index,
                          "item": done}]


async def events(deltas: Deltas, plan: ResponsePlan) -> AsyncIterator[r.StreamEvent]:
    """The stream's events, in order (see the module docstring)."""
    numbers = itertools.count()

    def event(fields: Event) -> r.StreamEvent:
        return r.StreamEvent(sequence_number=next(numbers), **fields)

    yield event({"type": "response.created", "response": plan.response("in_progress")})
    yield event({"type": "response.in_progress", "response": plan.response("in_progress")})
    output = _Output()
    streamed_calls = False
    async for _, delta in deltas:
        steps: list[Event] = []
        if delta.text or delta.logprobs:
            steps += output.text(delta.text, delta.logprobs)
        for part in delta.tool_call_parts:
            streamed_calls = True
            steps += output.call_part(part)
        if delta.finish_reason is not None:
            reason = finish_reason(delta.finish_reason)  # raises for a failed generation
            if not streamed_calls:
                for call in delta.tool_calls:
                    steps += output.whole_call(call)
            if not output.items and output.open is None:
                steps += output.text("", ())
            status = "incomplete" if reason == "length" else "completed"
            steps += output.close("incomplete" if status == "incomplete" else "completed")
            usage = UsageSum()
            usage.add(0, delta.usage)
            steps.append({"type": f"response.{status}",
                          "response": plan.response(status, output.items, usage.wire())})
        for step in steps:
            yield event(step)


async def collect(deltas: Deltas, plan: ResponsePlan) -> r.Response:
    """The whole answer as one Response: its text as a message (unless it only calls
    functions), then its calls."""
    message = _Message(0)
    calls: list[ToolCall] = []
    status = "completed"
    usage = UsageSum()
    async for _, delta in deltas:
        message.text += delta.text
        message.logprobs += delta.logprobs
        calls += delta.tool_calls
        if delta.finish_reason is not None:
            if finish_reason(delta.finish_reason) == "length":
                status = "incomplete"
            usage.add(0, delta.usage)
    output: list[r.OutputItem] = []
    if message.text or not calls:
        output.append(message.item("incomplete" if status == "incomplete" else "completed"))
    output += [_Call(0, call.name, call.id or tool_call_id(), arguments=call.arguments)
               .item("completed") for call in calls]
    return plan.response(status, output, usage.wire())
