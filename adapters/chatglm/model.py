"""ChatGLM-6B (v1, "GLM" blocks) in plain torch, numerically as THUDM's ``modeling_chatglm.py``.

What sets v1 apart from v2/v3 (each quirk cites THUDM/chatglm-6b ``modeling_chatglm.py``):

* post-LN "GLM" block: ``h = ln1(x) * alpha + attn(ln1(x))``, ``out = ln2(h) * alpha + mlp(ln2(h))``
  with ``alpha = sqrt(2 * 28)`` whatever the depth: ``GLMBlock.forward`` uses
  ``(2 * self.num_layers) ** 0.5`` but ``ChatGLMModel`` never passes ``num_layers``, so the
  default 28 of ``GLMBlock.__init__`` holds (the tiny 2-layer reference checkpoints confirm it);
* fused ``query_key_value`` laid out per head as ``[q | k | v]`` of ``head_dim`` each
  (``split_tensor_along_last_dim`` after ``view(..., heads, 3 * head_dim)``);
* 2-D rotary: the first half of each head turns with position row 0, the second half with row 1,
  ``rotate_half`` within each half; ``inv_freq`` is rounded to fp16 (``RotaryEmbedding.__init__``:
  ``inv_freq.half()``) and the checkpoint's copy is ignored;
* prefix-LM attention: bidirectional over the context (everything before ``<sop>``), causal from
  ``<sop>`` on; positions as ``tokenizer._pad`` builds them: row 0 is ``0..len-1`` with the
  ``[gMASK]`` position repeated from ``<sop>`` on, row 1 is 0 over the context then 1, 2, 3, ...;
* ``attention_fn``: q is divided by ``sqrt(head_dim) * (layer_id + 1)``, masked scores are
  filled with -10000, the scores are multiplied back by ``layer_id + 1`` in float32 and the
  softmax runs in float32;
* tanh GELU (``gelu_impl``), final LayerNorm, output layer tied to the word embeddings.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.chatglm.config import ChatGLMConfig
from adapters.family import KVCache
from adapters.runtime.dtypes import resolve_dtype
from adapters.runtime.kv_cache import KVCacheBase, batch_caches, own
from adapters.weights import native
from adapters.weights.checkpoint import CheckpointError
from adapters.weights.format import QuantLayout
from adapters.weights.layers import QuantizedEmbedding, from_thudm, use_native_linears
from adapters.weights.loader import load_weights

logger = logging.getLogger(__name__)

_MASKED_SCORE = -10000.0  # attention_fn: attention_scores.masked_fill_(attention_mask, -10000.0)
_ROTARY_BASE = 10000
# GLMBlock.__init__(..., num_layers=28): ChatGLMModel.get_layer does not pass config.num_layers.
_RESIDUAL_NUM_LAYERS = 28
# Stored by THUDM's checkpoints but not parameters here: the tied output layer and the rotary
# buffer (recomputed, fp16-rounded, as RotaryEmbedding does).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_IGNORED_NAMES = ("lm_head.weight",)
#: The four linears THUDM's quantization.py replaces in each layer; its quantize() runs on the
#: float32 weights with the float32 scale (stored as fp16 afterwards).
QUANT_LAYOUT = QuantLayout(
    layer_prefix="transformer.layers.",
    linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
             "mlp.dense_4h_to_h"),
    arithmetic=torch.float32,
)

# (layer, q, k, v, coeff) -> context: appends k/v ``[batch, heads, n, head_dim]`` to the
# cache(s) and attends ``q`` (already divided by ``sqrt(head_dim) * coeff``) over them.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def glm_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  mask: torch.Tensor | None, coeff: float) -> torch.Tensor:
    """``attention_fn`` after its query scaling: scores in the model dtype, masked with -10000,
    multiplied back by ``coeff`` and softmaxed in float32, probabilities in the model dtype."""
    scores = torch.matmul(q, keys.transpose(-1, -2))
    if mask is not None:
        scores = scores.masked_fill(mask, _MASKED_SCORE)
    probs = torch.softmax(scores.float() * coeff, dim=-1).to(values.dtype)
    return torch.matmul(probs, values)


class ChatGLMCache(KVCacheBase):
    """One sequence's keys and values, ``[layers, 2, heads, capacity, head_dim]``, plus the two
    facts its later positions depend on (context length, mask position)."""

    def __init__(self, config: ChatGLMConfig, dtype: torch.dtype, device: torch.device):
        super().__init__(config.num_layers, config.num_attention_heads, config.head_dim,
                         config.max_sequence_length, dtype, device)
        #: index of <sop> in the prompt: keys before it are seen by every position.
        self.context_length = 0
        #: index of [MASK]/[gMASK]: rotary row 0 of every position from <sop> on.
        self.mask_position: int | None = None

    def truncate(self, n: int) -> None:
        """Forget generated positions from ``n`` on.  The context itself cannot be cut: it is
        attended bidirectionally, so its keys depend on all of it."""
        if n < self.context_length:
            raise ValueError("a ChatGLM-6B cache cannot be cut inside its context")
        super().truncate(n)

    def positions(self, index: int) -> tuple[int, int]:
        """The 2-D position of the token at ``index`` (tokenizer ``_pad`` and
        ``_update_model_kwargs_for_generation``: row 0 stays at the mask, row 1 counts on)."""
        if index < self.context_length:
            return index, 0
        row0 = index if self.mask_position is None else self.mask_position
        return row0, index - self.context_length + 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # attention_fn: query_key_layer_scaling_coeff = float(layer_id + 1)
        self.coeff = float(layer + 1)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, ...], attend: Attend
                ) -> torch.Tensor:
        batch, n, hidden = x.shape
        mixed = self.query_key_value(x).view(batch, n, self.heads, 3 * self.head_dim)
        q, k, v = mixed.split(self.head_dim, dim=-1)
        cos0, sin0, cos1, sin1 = rotary
        half = self.head_dim // 2
        q = torch.cat((q[..., :half] * cos0 + _rotate_half(q[..., :half]) * sin0,
                       q[..., half:] * cos1 + _rotate_half(q[..., half:]) * sin1), dim=-1)
        k = torch.cat((k[..., :half] * cos0 + _rotate_half(k[..., :half]) * sin0,
                       k[..., half:] * cos1 + _rotate_half(k[..., half:]) * sin1), dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, n, head_dim]
        q = q / (math.sqrt(self.head_dim) * self.coeff)
        context = attend(self.layer, q, k, v, self.coeff)
        return self.dense(context.transpose(1, 2).reshape(batch, n, hidden))


class GLU(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gelu_impl: 0.5 * x * (1 + tanh(0.7978845608028654 * x * (1 + 0.044715 * x * x)))
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size,
                                                     eps=config.layernorm_epsilon)
        self.mlp = GLU(config)
        self.alpha = (2 * _RESIDUAL_NUM_LAYERS) ** 0.5

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, ...], attend: Attend
                ) -> torch.Tensor:
        attention_input = self.input_layernorm(x)
        x = attention_input * self.alpha + self.attention(attention_input, rotary, attend)
        mlp_input = self.post_attention_layernorm(x)
        return mlp_input * self.alpha + self.mlp(mlp_input)


class Transformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class ChatGLMModel(nn.Module):
    """ChatGLM-6B implementing :class:`adapters.family.CausalLM`.

    Parameter names equal THUDM's state dict (``transformer.layers.N.attention.query_key_value``
    ...), so the four linears of each layer can be swapped by name (quantization).
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        if not config.position_encoding_2d:
            raise CheckpointError("position_encoding_2d=false is not a ChatGLM-6B model")
        self.config = config
        self.transformer = Transformer(config)
        self.padded_vocab_size = config.vocab_size
        self.context_length = config.max_sequence_length
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._inv_freq = torch.empty(0)
        #: set for int4-qe folders (quantized embeddings): the quantized, tied output layer; for
        #: bf16 on the native kernels: the packed output layer the embedding reads from
        self.lm_head: nn.Module | None = None
        #: the native kernels where attention runs on them (bf16 on the CPU; finish_loading)
        self._attention: ctypes.CDLL | None = None

    def finish_loading(self, dtype: torch.dtype, device: torch.device) -> None:
        """Record where the weights live and compute the rotary frequencies there."""
        self.dtype = dtype
        self.device = device
        rotary_dim = self.config.head_dim // 2  # each half of a head has its own rotary
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
        inv_freq = 1.0 / (_ROTARY_BASE ** exponents)
        # RotaryEmbedding.__init__: inv_freq = inv_freq.half()
        self._inv_freq = inv_freq.half().float().to(device)
        # bf16 on the CPU: the four linears of every layer and the tied output layer on the native
        # kernels (batch-invariant rows, weights streamed at the memory's rate); the embedding
        # then reads its rows from the output layer's packed storage (one copy of the table).
        use_native_linears(self, QUANT_LAYOUT)
        if self.lm_head is None and isinstance(self.transformer.word_embeddings, nn.Embedding):
            packed = native.PackedEmbedding.replacing(self.transformer.word_embeddings)
            if packed is not None:
                self.transformer.word_embeddings = packed  # type: ignore[assignment]
                self.lm_head = packed.linear
        self._attention = None
        if (dtype == torch.bfloat16 and device.type == "cpu"
                and self.config.head_dim % native.ATTENTION_HEAD_MULTIPLE == 0):
            self._attention = native.library()
        self.eval()

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache memory one position takes (keys + values, every layer)."""
        c = self.config
        return c.num_layers * 2 * c.hidden_size * self.dtype.itemsize

    def new_cache(self) -> ChatGLMCache:
        return ChatGLMCache(self.config, self.dtype, self.device)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """cos/sin for rows 0 and 1 of ``positions`` ``[batch, n, 2]``, each ``[batch, n, 1, d]``.
        Angles in float32 as the float32 reference computes them."""
        out: list[torch.Tensor] = []
        for row in (0, 1):
            freqs = positions[..., row, None].float() * self._inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
            out += [emb.cos().to(self.dtype), emb.sin().to(self.dtype)]
        return tuple(out)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend,
             every: bool = False) -> torch.Tensor:
        x = self.transformer.word_embeddings(tokens)
        rotary = self._rotary(positions)
        for layer in self.transformer.layers:
            x = layer(x, rotary, attend)
        last = self.transformer.final_layernorm(x if every else x[:, -1])
        if self.lm_head is not None:
            return self.lm_head(last).float()
        # The output layer is tied to the word embeddings (lm_head.weight is the same tensor).
        return F.linear(last, self.transformer.word_embeddings.weight).float()

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], cache: KVCache,  # type: ignore[override]
                every_position: bool = False) -> torch.Tensor:
        """Append ``ids`` to ``cache``; float32 logits ``[padded_vocab]`` of the last position
        (``[len(ids), padded_vocab]`` of every position with ``every_position``).

        The first call (empty cache) is the prompt, ending with ``[gMASK] <sop>``: it fixes the
        context (everything before ``<sop>``, seen bidirectionally) and the mask position.
        Later calls append generated ids, causally.
        """
        kv = own(cache, ChatGLMCache)
        ids = [int(i) for i in ids]
        n = len(ids)
        if n == 0:
            raise ValueError("forward needs at least one id")
        c = self.config
        start = kv.length
        if start == 0:
            kv.context_length = ids.index(c.bos_token_id) if c.bos_token_id in ids else n
            # tokenizer _pad: mask_token = MASK if MASK in input else gMASK
            mask_token = c.mask_token_id if c.mask_token_id in ids else c.gmask_token_id
            kv.mask_position = ids.index(mask_token) if mask_token in ids else None
        kv.reserve(n)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.tensor([[kv.positions(j) for j in range(start, start + n)]],
                                 dtype=torch.long, device=self.device)
        query = torch.arange(start, start + n, device=self.device)[:, None]
        key = torch.arange(start + n, device=self.device)[None, :]
        # get_masks: tril, plus every query sees the whole context; True = masked.
        blocked = (key > query) & (key >= kv.context_length)
        mask = blocked if bool(blocked.any()) else None

        lib = self._attention
        # native: query j attends every position up to itself and the whole context (a prefix)
        lengths = torch.clamp(query[:, 0] + 1, min=kv.context_length)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   coeff: float) -> torch.Tensor:
            keys, values = kv.write(layer, k[0], v[0])
            if lib is not None:  # each query as a decode step of its position computes it
                context = native.prefill_attention(lib, kv.storage, layer, q[0].transpose(0, 1),
                                                   lengths, glm_coeff=coeff)
                return context.transpose(0, 1)[None]
            return glm_attention(q, keys[None], values[None], mask, coeff)

        logits = self._run(tokens, positions, attend, every=every_position)
        kv.commit(n)
        return logits[0]

    @torch.inference_mode()
    def forward_batch(self, ids_per_seq: Sequence[Sequence[int]],
                      caches: Sequence[KVCache], every_position: bool = False) -> torch.Tensor:
        """Decode one new id per sequence in one pass; float32 logits ``[B, padded_vocab]``.

        Sequences may have different lengths: histories are right-padded to the longest and the
        padding is masked, so each row equals a solo :meth:`forward`.

        With ``every_position`` a sequence may bring several ids (verifying drafted ids): the
        logits after every fed id, ``[sum of the id counts, padded_vocab]`` in order.
        """
        if every_position:
            return self._forward_several(ids_per_seq, batch_caches(
                ids_per_seq, caches, ChatGLMCache, several=True))
        owned = batch_caches(ids_per_seq, caches, ChatGLMCache)
        starts = [cache.length for cache in owned]
        for cache in owned:
            cache.reserve(1)
        batch, total = len(owned), max(starts) + 1
        tokens = torch.tensor([[int(ids[0])] for ids in ids_per_seq], dtype=torch.long,
                              device=self.device)
        positions = torch.tensor([[cache.positions(s)] for cache, s in zip(owned, starts, strict=True)],
                                 dtype=torch.long, device=self.device)
        lengths = torch.tensor(starts, device=self.device)[:, None] + 1
        padding = torch.arange(total, device=self.device)[None, :] >= lengths  # [B, total]
        mask = padding[:, None, None, :] if bool(padding.any()) else None
        c = self.config

        lib = self._attention
        decode = native.DecodeBatch([cache.storage for cache in owned],
                                    [start + 1 for start in starts]) if lib is not None else None

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   coeff: float) -> torch.Tensor:
            if lib is not None and decode is not None:  # in place, as a solo forward computes it
                return native.decode_attention(lib, decode, layer, q.transpose(1, 2),
                                               k.transpose(1, 2), v.transpose(1, 2),
                                               glm_coeff=coeff)
            shape = (batch, c.num_attention_heads, total, c.head_dim)
            keys = torch.zeros(shape, dtype=k.dtype, device=k.device)
            values = torch.zeros(shape, dtype=v.dtype, device=v.device)
            for b, (cache, start) in enumerate(zip(owned, starts, strict=True)):
                kb, vb = cache.write(layer, k[b], v[b])
                keys[b, :, : start + 1] = kb
                values[b, :, : start + 1] = vb
            return glm_attention(q, keys, values, mask, coeff)

        logits = self._run(tokens, positions, attend)
        for cache in owned:
            cache.commit(1)
        return logits

    def _forward_several(self, ids_per_seq: Sequence[Sequence[int]],
                         owned: Sequence[ChatGLMCache]) -> torch.Tensor:
        """:meth:`forward_batch` with several ids per sequence, right-padded to the longest
        (``[B, T]``): each fed id attends causally up to itself (generated positions are past
        the context, so the prefix-LM part is already fixed); padded rows are dropped (they
        attend nothing and write nothing)."""
        counts = [len(ids) for ids in ids_per_seq]
        starts = [cache.length for cache in owned]
        for cache, n in zip(owned, counts, strict=True):
            cache.reserve(n)
        width = max(counts)
        tokens = torch.tensor([[int(t) for t in ids] + [int(ids[-1])] * (width - len(ids))
                               for ids in ids_per_seq], dtype=torch.long, device=self.device)
        positions = torch.tensor([[cache.positions(s + j) for j in range(width)]
                                  for cache, s in zip(owned, starts, strict=True)],
                                 dtype=torch.long, device=self.device)
        lib = self._attention

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   coeff: float) -> torch.Tensor:
            # q [B, heads, T, hd]; each sequence's fed ids attend causally up to themselves,
            # as the solo forward computes them (natively: each as a decode step would)
            out = torch.zeros_like(q)
            for b, (cache, s, n) in enumerate(zip(owned, starts, counts, strict=True)):
                keys, values = cache.write(layer, k[b, :, :n], v[b, :, :n])
                if lib is not None:
                    lengths = torch.arange(s + 1, s + n + 1, device=self.device)
                    out[b, :, :n] = native.prefill_attention(
                        lib, cache.storage, layer, q[b, :, :n].transpose(0, 1), lengths,
                        glm_coeff=coeff).transpose(0, 1)
                else:
                    query = torch.arange(s, s + n, device=self.device)[:, None]
                    blocked = torch.arange(s + n, device=self.device)[None, :] > query
                    out[b, :, :n] = glm_attention(q[b:b + 1, :, :n], keys[None], values[None],
                                                  blocked[None, None], coeff)[0]
            return out

        logits = self._run(tokens, positions, attend, every=True)
        for cache, n in zip(owned, counts, strict=True):
            cache.commit(n)
        return torch.cat([logits[b, :n] for b, n in enumerate(counts)])


class _QuantizedEmbeddings:
    """The int4-qe part of a load: THUDM's ``quantize(..., quantize_embeddings=True)`` stores
    ``transformer.word_embeddings.weight`` packed like the linears, with ``weight_scale``, and
    an ``lm_head`` quantized from the same tensor (chatglm-6b-int4-qe modeling_chatglm.py).  The
    embedding becomes a :class:`~adapters.weights.layers.QuantizedEmbedding` and the output layer the
    matching weight-only linear; a stored ``lm_head`` copy is not needed (it is tied)."""

    NAMES = ("transformer.word_embeddings.weight", "transformer.word_embeddings.weight_scale")

    def __init__(self, model: ChatGLMModel, config: ChatGLMConfig, dtype: torch.dtype,
                 device: torch.device):
        if config.quantization_bit not in (4, 8):
            raise CheckpointError("quantization_embeddings needs quantization_bit 4 or 8")
        self.model, self.bits, self.dtype, self.device = model, config.quantization_bit, dtype, device
        self.parts: dict[str, torch.Tensor] = {}
        # Not a parameter any more: the weight loop must neither expect nor fill it.
        model.transformer.word_embeddings = nn.Identity()  # type: ignore[assignment]

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        if name in self.NAMES:
            self.parts[name] = tensor.to(self.device)
            return True
        return name == "lm_head.weight_scale"  # the tied copy; lm_head.weight is ignored anyway

    def finish(self, folder: Path) -> None:
        missing = [n for n in self.NAMES if n not in self.parts]
        if missing:
            raise CheckpointError(f"{folder}: int4-qe checkpoint lacks {missing}")
        weight, scale = (self.parts[n] for n in self.NAMES)
        if weight.dtype != torch.int8:
            raise CheckpointError(f"{folder}: quantized embeddings must be int8, got {weight.dtype}")
        self.model.transformer.word_embeddings = QuantizedEmbedding(  # type: ignore[assignment]
            weight, scale, self.bits, self.dtype)
        # float32 models take the exact dequantising path, as for the other linears
        self.model.lm_head = from_thudm(weight, scale, self.bits,
                                        kernel=False if self.dtype == torch.float32 else None)


def load_model(folder: Path, config: ChatGLMConfig, *, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", quantize: str | None = None) -> ChatGLMModel:
    """Build the model on the ``meta`` device, then move the checkpoint's tensors in one at a
    time (converted to ``dtype`` on ``device``), so two copies of the weights never coexist.

    Unknown, duplicate, missing or mis-shaped tensors are a :class:`CheckpointError`.  THUDM
    pre-quantized folders (``quantization_bit`` 4/8) and ``quantize`` go through
    :class:`adapters.weights.loader.QuantizedLinearLoader`.
    """
    folder = Path(folder)
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    with torch.device("meta"):
        model = ChatGLMModel(config)
    embeddings = _QuantizedEmbeddings(model, config, dtype, device) if (
        config.quantization_embeddings) else None
    count = load_weights(model, folder, QUANT_LAYOUT, quantization_bit=config.quantization_bit,
                         quantize=quantize, dtype=dtype, device=device,
                         consume=lambda name, tensor: (
                             embeddings is not None and embeddings.take(name, tensor))
                         or name in _IGNORED_NAMES or name.endswith(_IGNORED_SUFFIXES))
    if embeddings is not None:
        embeddings.finish(folder)
    model.finish_loading(dtype, device)
    logger.info("loaded ChatGLM-6B from %s: %d tensors as %s on %s", folder, count, dtype, device)
    return model
