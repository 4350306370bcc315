"""Prompts exactly as THUDM's chat() builds them for ChatGLM2-6B and ChatGLM3-6B.

Both return ``(ids, text)``: ``ids`` are what the model is fed, ``text`` is for logs only.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.chatglm2.tokenizer import ChatGLM2Tokenizer
from adapters.conversation import Conversation

_V3_ROLES = ("system", "user", "assistant", "observation")
#: what follows the query in a chatglm2-6b prompt (``build_prompt``)
_V2_ANSWER = "\n\n答："


def prompt_text_v2(conv: Conversation) -> str:
    """chatglm2-6b ``tokenizer.build_prompt``: rounds numbered from 1 (chatglm-6b counts from 0)."""
    parts = [
        f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(conv.history, start=1)
    ]
    parts.append(f"[Round {len(conv.history) + 1}]\n\n问：{conv.query}{_V2_ANSWER}")
    return "".join(parts)


def build_prompt_v2(tok: ChatGLM2Tokenizer, conv: Conversation) -> tuple[list[int], str]:
    """``[gMASK] sop`` + encode(prompt) (chatglm2-6b ``build_inputs_with_special_tokens`` prefixes)."""
    text = prompt_text_v2(conv)
    ids = [tok.special("[gMASK]"), tok.special("sop"), *tok.encode(text)]
    return ids, text


def query_span_v2(tok: ChatGLM2Tokenizer, conv: Conversation,
                  ids: Sequence[int]) -> tuple[int, int]:
    """The ids that cover the query's text.  The whole prompt is ONE SentencePiece encode, so a
    piece may straddle the query's edge (``"：("`` is one piece): such a piece counts as the
    query's.  Byte offsets come from the pieces' bytes, which spell the prompt exactly (identity
    normalisation, byte fallback) after the one dummy-prefix space."""
    text = prompt_text_v2(conv).encode("utf-8")
    end_byte = len(text) - len(_V2_ANSWER.encode("utf-8"))
    start_byte = end_byte - len(conv.query.encode("utf-8"))
    body = ids[2:]  # after [gMASK] sop
    ends, total = [], 0
    for token_id in body:
        total += len(tok.token_bytes(token_id))
        ends.append(total)
    dummy = total - len(text)  # the leading "▁" SentencePiece adds (0 if a model does not)
    start = next(i for i, end in enumerate(ends) if end - dummy > start_byte)
    stop = next((i for i, end in enumerate(ends) if end - dummy >= end_byte), len(ends) - 1) + 1
    return 2 + start, 2 + max(stop, start)


def query_span_v3(tok: ChatGLM2Tokenizer, conv: Conversation,
                  ids: Sequence[int]) -> tuple[int, int]:
    """The ids of the query's content: ``build_chat_input`` encodes it on its own, right before
    the closing ``<|assistant|>``."""
    end = len(ids) - 1
    return end - len(tok.encode(conv.query)), end


def _message(tok: ChatGLM2Tokenizer, role: str, metadata: str, content: str) -> list[int]:
    """chatglm3-6b ``build_single_message``: role token, encode(metadata + "\\n"), encode(content).

    The two encodes are separate, so each gets SentencePiece's dummy prefix ("▁" before the
    newline and before the content): that is what the model was trained on.
    """
    if role not in _V3_ROLES:
        raise ValueError(f"ChatGLM3 has no role {role!r}; expected one of {_V3_ROLES}")
    return [tok.special(f"<|{role}|>"), *tok.encode(f"{metadata}\n"), *tok.encode(content)]


def build_prompt_v3(tok: ChatGLM2Tokenizer, conv: Conversation) -> tuple[list[int], str]:
    """chatglm3-6b ``build_chat_input``: ``[gMASK] sop``, every turn, the query, ``<|assistant|>``.

    A system turn carrying tools must already hold ``content + "\\n" + json.dumps(tools,
    indent=4, ensure_ascii=False)`` as the reference appends it.
    """
    ids = [tok.special("[gMASK]"), tok.special("sop")]
    for turn in conv.turns:
        ids += _message(tok, turn.role, turn.metadata, turn.content)
    ids += _message(tok, conv.query_role, "", conv.query)
    ids.append(tok.special("<|assistant|>"))
    return ids, tok.decode(ids)
