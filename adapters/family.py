"""The token-level contracts each ChatGLM family implements, and the row that describes a family.

The engine sees token ids only (it never builds prompts); the prompt code sees strings only.
A family plugs in through three small protocols:

* :class:`Tokenizer`   text <-> ids exactly as THUDM's tokenizer for that family does;
* :class:`CausalLM`    a torch model that turns ids into next-token logits, with its own KV cache;
* :class:`FamilySpec`  a row of data + functions: how to read the folder, build a prompt, and
  post-process an answer the way the official ``chat()`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from adapters.base import GrammarSpec, Message, Tool, ToolCall, ToolCallPart, ToolChoice
    from adapters.conversation import Conversation, SystemPolicy
    from adapters.weights.format import QuantLayout


class Tokenizer(Protocol):
    """Exact THUDM ids.  ``encode`` treats its input as user text: it never yields a control id."""

    #: ids ``< vocab_size`` can be decoded; the model's (padded) logits may be wider.
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Decode as the reference ``tokenizer.decode`` does (control ids as the reference shows them)."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for on its own (byte-fallback tokens give one raw byte)."""
        ...


class KVCache(Protocol):
    """Per-sequence state a :class:`CausalLM` keeps between calls.  Opaque to the engine."""

    @property
    def length(self) -> int:
        """Number of positions already in the cache."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of memory the cache holds."""
        ...

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` positions (families with ``prefix_reuse`` only)."""
        ...

    def copy_prefix(self, n: int, room: int = 0) -> KVCache:
        """A new cache with a copy of the first ``n`` positions (room allocated for ``room``
        more), leaving this one unchanged (prefix reuse: families with ``causal_prompt``)."""
        ...


class CausalLM(Protocol):
    """A decoder in torch.  ``forward`` appends ``ids`` to ``cache`` and returns float32 logits of
    the last position (shape ``[padded_vocab]``), or of every fed position (``[len(ids),
    padded_vocab]``) with ``every_position`` (prompt logprobs, verifying drafted tokens)."""

    padded_vocab_size: int
    context_length: int
    device: torch.device
    dtype: torch.dtype

    @property
    def kv_bytes_per_token(self) -> int: ...

    def new_cache(self) -> KVCache: ...

    def forward(self, ids: Sequence[int], cache: KVCache,
                every_position: bool = False) -> torch.Tensor: ...

    def forward_batch(
        self, ids_per_seq: Sequence[Sequence[int]], caches: Sequence[KVCache],
        every_position: bool = False,
    ) -> torch.Tensor:
        """One step for several sequences at different lengths: float32 ``[B, padded_vocab]``,
        equal row by row to ``forward`` of each sequence alone.

        With ``every_position`` each sequence may bring several ids (a step verifying drafted
        ids, see ``adapters/runtime/speculative.py``): the logits after every fed id,
        ``[sum of the id counts, padded_vocab]`` in order, each row as a one-id step there."""
        ...


class StreamPostprocessor(Protocol):
    """Turns raw decoded text into what the official ``chat()`` returns, incrementally.

    ``feed`` gets new raw text and returns new output text that can no longer change;
    ``finish`` returns the rest.  The concatenation of everything returned equals
    ``process(raw_text)`` of the family's official post-processing.
    """

    #: set by ``finish`` when the answer was a tool call (only if created with ``tools=True``)
    tool_calls: tuple[ToolCall, ...]

    def feed(self, text: str) -> str: ...

    def finish(self) -> str: ...


@runtime_checkable
class StreamsToolCalls(Protocol):
    """A post-processor that also reports tool calls while they are generated."""

    def take_parts(self) -> tuple[ToolCallPart, ...]:
        """The parts found since the last call (see :class:`~adapters.base.ToolCallPart`)."""
        ...


@dataclass(frozen=True)
class FamilySpec:
    """A ChatGLM family as data.  Variants (int4, int8, fp16, v2/v3) differ in rows, not classes;
    the registry names each row (``adapters/registry.py``), nothing else does."""

    description: str
    #: Whether a checkpoint folder (its ``config.json`` already read) is of this family; the
    #: registry asks the rows in order and takes the first that claims the folder.
    claims: Callable[[Path, dict[str, Any]], bool]
    #: ids that end a generation (the reference's ``eos_token_id`` list for chat()).
    stop_ids: frozenset[int]
    load_tokenizer: Callable[[Path], Tokenizer]
    load_model: Callable[..., CausalLM]  # (path, config, dtype=, device=, quantize=) -> CausalLM
    read_config: Callable[[Path], Any]
    #: OpenAI messages (+ offered tools, + the server's system policy) -> what the official
    #: chat() takes; raises InvalidRequest for a conversation the family cannot express.
    to_conversation: Callable[[Sequence[Message], Sequence[Tool], SystemPolicy], Conversation]
    build_prompt: Callable[[Tokenizer, Conversation], tuple[list[int], str]]
    new_postprocessor: Callable[[bool], StreamPostprocessor]  # (tools offered) -> processor
    #: the grammar an answer must follow when tools are offered (the family's call format;
    #: None: unconstrained)
    tool_grammar: Callable[[Sequence[Tool], ToolChoice], GrammarSpec | None]
    #: the linears THUDM quantises in this family's checkpoints, and its reference rounding
    quant_layout: QuantLayout
    #: ChatGLM3's chat() drops the last generated id, assuming it is eos
    #: (modeling_chatglm.py: ``outputs.tolist()[0][len(inputs["input_ids"][0]):-1]``), so a
    #: generation cut by the length limit loses its last token there; we reproduce that.
    drop_last_token_on_length: bool = False
    #: Causal attention over the whole prompt: the KV of a prompt prefix does not depend on what
    #: follows it, so a cached prefix can be reused and a long prompt prefilled in chunks.
    #: ChatGLM-6B attends bidirectionally over its context (prefix-LM), so neither holds there.
    causal_prompt: bool = True
    #: ``(tokenizer, conversation, ids build_prompt made) -> (start, end)``: the ids that cover
    #: the query's text (the last user message), scored for legacy completions' ``echo``
    #: with ``logprobs``; None: this family cannot say (such a request is a 400)
    query_span: Callable[[Tokenizer, Conversation, Sequence[int]], tuple[int, int]] | None = None
