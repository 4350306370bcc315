"""ChatGLM-6B, the first generation: ``[Round n]`` prompt ending in ``[gMASK] <sop>``, GLM blocks
with 2-D rotary, unigram ``ice_text.model`` tokenizer."""

from __future__ import annotations

from adapters.chatglm.config import ChatGLMConfig, claims, read_config
from adapters.chatglm.model import QUANT_LAYOUT, ChatGLMCache, ChatGLMModel, load_model
from adapters.chatglm.postprocess import ChatGLMStreamPostprocessor, process_response
from adapters.chatglm.prompt import build_prompt, prompt_text, query_span
from adapters.chatglm.tokenizer import ChatGLMTokenizer, load_tokenizer
from adapters.conversation import to_pairs
from adapters.family import FamilySpec
from adapters.tool_convention import call_grammar, with_tool_calls

# <eop>, the eos of chatglm-6b's config.json.  chat() passes no eos_token_id of its own, so
# generate() stops on config.eos_token_id only: "</s>" (2) is a control piece that renders as
# nothing and does not stop the reference, so it does not stop us either.
EOP_ID = 130005

SPEC = FamilySpec(
    description="ChatGLM-6B: [Round n] prompt ending in [gMASK] <sop>, 2-D rotary GLM blocks",
    claims=claims,
    stop_ids=frozenset({EOP_ID}),
    load_tokenizer=load_tokenizer,
    load_model=load_model,
    read_config=read_config,
    to_conversation=to_pairs,
    build_prompt=build_prompt,  # type: ignore[arg-type]
    new_postprocessor=with_tool_calls(ChatGLMStreamPostprocessor),
    tool_grammar=call_grammar,
    quant_layout=QUANT_LAYOUT,
    causal_prompt=False,  # prefix-LM: bidirectional attention over the whole context
    query_span=query_span,  # type: ignore[arg-type]
)

__all__ = [
    "SPEC",
    "ChatGLMCache",
    "ChatGLMConfig",
    "ChatGLMModel",
    "ChatGLMStreamPostprocessor",
    "ChatGLMTokenizer",
    "build_prompt",
    "load_model",
    "load_tokenizer",
    "process_response",
    "prompt_text",
    "read_config",
]
