"""Prompts exactly as THUDM's ``chat()`` builds them for ChatGLM-6B.

``build_prompt`` returns ``(ids, text)``: ``ids`` are what the model is fed, ``text`` is for logs.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.base import InvalidRequest
from adapters.chatglm.tokenizer import ChatGLMTokenizer
from adapters.conversation import Conversation


def prompt_text(conv: Conversation) -> str:
    """chatglm-6b ``chat()``: the bare query without history, else rounds numbered from 0
    (chatglm2-6b counts from 1) with a single newline between lines."""
    if not conv.history:
        return conv.query
    parts = [f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(conv.history)]
    parts.append(f"[Round {len(conv.history)}]\n问：{conv.query}\n答：")
    return "".join(parts)


def build_prompt(tok: ChatGLMTokenizer, conv: Conversation) -> tuple[list[int], str]:
    """encode(prompt) + ``[gMASK]`` + ``<sop>``: chatglm-6b ``build_inputs_with_special_tokens``
    appends them at the END (v2/v3 prefix theirs)."""
    text = prompt_text(conv)
    return [*tok.encode(text), tok.gmask_id, tok.sop_id], text


def query_span(tok: ChatGLMTokenizer, conv: Conversation, ids: Sequence[int]) -> tuple[int, int]:
    """The ids of the query's text: without history the prompt IS the query, so everything
    before ``[gMASK] <sop>``.  (With history the query sits inside the ``[Round n]`` text, whose
    normalising tokenizer gives no offsets; nothing asks for that span.)"""
    if conv.history:
        raise InvalidRequest("ChatGLM-6B scores a prompt only as a first turn (no history).",
                             param="messages")
    return 0, len(ids) - 2
