"""Prompts exactly as THUDM's ``chat()`` builds them for ChatGLM-6B.

``build_prompt`` returns ``(ids, text)``: ``ids`` are what the model is fed, ``text`` is for logs.
"""

from __future__ import annotations

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
