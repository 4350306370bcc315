"""ChatGLM2-6B and ChatGLM3-6B: one architecture and tokenizer file, two chat protocols.

The two :class:`~adapters.family.FamilySpec` rows differ only in data: the conversation mapping,
the prompt builder, the control tokens the tokenizer knows, the stop ids and the answer
post-processing.
"""

from __future__ import annotations

from functools import partial

from adapters.chatglm2.config import (
    ChatGLM2Config,
    claims_v2,
    claims_v3,
    detect_version,
    read_config,
)
from adapters.chatglm2.conversation import to_turns
from adapters.chatglm2.model import QUANT_LAYOUT, ChatGLM2Model, load_model
from adapters.chatglm2.postprocess import ChatGLM2Postprocessor, ChatGLM3Postprocessor
from adapters.chatglm2.prompt import (
    build_prompt_v2,
    build_prompt_v3,
    query_span_v2,
    query_span_v3,
)
from adapters.chatglm2.tokenizer import ChatGLM2Tokenizer, load_tokenizer
from adapters.chatglm2.tools import call_grammar
from adapters.conversation import to_pairs
from adapters.family import FamilySpec
from adapters.tool_convention import call_grammar as json_call_grammar
from adapters.tool_convention import with_tool_calls

# The FamilySpec rows are data fixed before any tokenizer file is read, so the stop ids are
# literals: eos "</s>" is SentencePiece id 2; ChatGLM3's <|user|> and <|observation|> are
# n + 6 and n + 8 for the n = 64789 pieces of THUDM's tokenizer.model (chatglm3-6b
# modeling_chatglm.py chat(): eos_token_id = [eos, <|user|>, <|observation|>]).
# tests/test_chatglm2_tokenizer.py checks them against the real file.
EOS_ID = 2
V3_USER_ID = 64795
V3_OBSERVATION_ID = 64797

V2_SPEC = FamilySpec(
    description="ChatGLM2-6B: [Round n] prompt prefixed by [gMASK] sop, 1-D rotary, MQA",
    claims=claims_v2,
    stop_ids=frozenset({EOS_ID}),
    load_tokenizer=partial(load_tokenizer, version="chatglm2"),
    load_model=load_model,
    read_config=read_config,
    to_conversation=to_pairs,
    build_prompt=build_prompt_v2,  # type: ignore[arg-type]
    new_postprocessor=with_tool_calls(ChatGLM2Postprocessor),
    tool_grammar=json_call_grammar,
    quant_layout=QUANT_LAYOUT,
    query_span=query_span_v2,  # type: ignore[arg-type]
)

V3_SPEC = FamilySpec(
    description="ChatGLM3-6B: role tokens (system/user/assistant/observation), tool calls",
    claims=claims_v3,
    stop_ids=frozenset({EOS_ID, V3_USER_ID, V3_OBSERVATION_ID}),
    load_tokenizer=partial(load_tokenizer, version="chatglm3"),
    load_model=load_model,
    read_config=read_config,
    to_conversation=to_turns,
    build_prompt=build_prompt_v3,  # type: ignore[arg-type]
    new_postprocessor=ChatGLM3Postprocessor,
    tool_grammar=call_grammar,
    quant_layout=QUANT_LAYOUT,
    drop_last_token_on_length=True,
    query_span=query_span_v3,  # type: ignore[arg-type]
)

__all__ = [
    "V2_SPEC",
    "V3_SPEC",
    "ChatGLM2Config",
    "ChatGLM2Model",
    "ChatGLM2Tokenizer",
    "detect_version",
    "load_model",
    "load_tokenizer",
    "read_config",
]
