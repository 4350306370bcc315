"""The ChatGLM2-6B / ChatGLM3-6B decoder in plain torch (same architecture for v2 and v3).

Module names follow THUDM's state dict (``transformer.encoder.layers.N.self_attention.
query_key_value`` …) so checkpoints load by name and a quantizer can swap the four
``nn.Linear`` of each block by name.  Tensors are batch-first ``[B, T, …]`` here; THUDM's
``modeling_chatglm.py`` is sequence-first, which changes no arithmetic.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.chatglm2.config import ChatGLM2Config
from adapters.family import KVCache
from adapters.runtime.dtypes import resolve_dtype
from adapters.runtime.kv_cache import KVCacheBase, batch_caches, own
from adapters.weights import native
from adapters.weights.format import QuantLayout
from adapters.weights.layers import use_native_linears
from adapters.weights.loader import load_weights

logger = logging.getLogger(__name__)

#: The four linears THUDM's quantization.py replaces in each layer; chatglm2-6b quantises the
#: fp16 weights in fp16 arithmetic (``weight.abs().max() / qmax``, ``weight / scale``).
QUANT_LAYOUT = QuantLayout(
    layer_prefix="transformer.encoder.layers.",
    linears=("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
             "mlp.dense_4h_to_h"),
    arithmetic=torch.float16,
)


# --------------------------------------------------------------------------- cache


class ChatGLM2Cache(KVCacheBase):
    """Keys and values of one sequence: ``[layers, 2, kv groups, capacity, head]``."""


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """modeling_chatglm.py RMSNorm: variance in float32, scaled by the weight, back to input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.native: ctypes.CDLL | None = None  # set by ChatGLM2Model.finish_loading

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return native.rms_norm(self.native, x, self.weight, self.eps)
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def _norm(cfg: ChatGLM2Config) -> nn.Module:
    if cfg.rmsnorm:
        return RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)


def rope_table(positions: int, head_dim: int, rope_ratio: float, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """``[positions, head_dim // 4, 2]`` (cos, sin) as modeling_chatglm.py RotaryEmbedding:
    rotary over half the head (``dim = kv_channels // 2``), base ``10000 * rope_ratio``,
    computed in float32 then cast to half/bf16 when the model runs in it."""
    n_elem = head_dim // 2
    base = 10000 * rope_ratio
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float, device=device) / n_elem))
    idx_theta = torch.outer(torch.arange(positions, dtype=torch.float, device=device), theta)
    table = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
    return table.to(dtype) if dtype in (torch.float16, torch.bfloat16) else table


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of the first half of each head.

    ``x``: ``[B, T, heads, head]``; ``rope``: ``[B or 1, T, rot/2, 2]``.
    """
    rot = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
    cos = rope[..., 0].unsqueeze(2)
    sin = rope[..., 1].unsqueeze(2)
    rotated = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin],
        dim=-1,
    ).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of ONE new query per sequence: ``q [B, 1, heads, hd]`` over ``keys`` / ``values``
    ``[B, groups, L, hd]`` (``mask [B, 1, 1, L]``, True = attend); returns ``[B, heads, 1, hd]``.

    Why not ``scaled_dot_product_attention``: on CPU (torch 2.13) a single-query call with
    ``enable_gqa`` costs more than the layer's int4 matmuls; grouping the query heads of each KV
    group into the rows of one matmul (the MQA layout: query head h reads group h // (heads /
    groups), as ``enable_gqa``) is far cheaper (``python -m bench.kernels --attention``).  Computed in fp32 whatever the model dtype,
    like the CPU flash kernel's accumulators; scale 1/sqrt(hd) as SDPA's default.
    """
    b, _, heads, hd = q.shape
    groups = keys.shape[1]
    qg = q.reshape(b, groups, heads // groups, hd).float()
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)).mul_(hd ** -0.5)
    if mask is not None:
        scores.masked_fill_(~mask.view(b, 1, 1, -1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values.float())
    return out.reshape(b, heads, 1, hd).to(q.dtype)


# How one forward pass stores new keys/values and reads the history of every sequence:
# (layer, keys [B, T, g, hd], values [B, T, g, hd]) -> (all keys [B, g, L, hd], all values).
KVStore = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# A step that stores and attends in one call (the native kernels, reading every cache in place):
# (layer, q [B, T, heads, hd], k, v [B, T, g, hd]) -> [B, T, heads, hd].
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SelfAttention(nn.Module):
    def __init__(self, cfg: ChatGLM2Config):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.groups = cfg.kv_groups
        self.head_dim = cfg.kv_channels
        self.multi_query = cfg.multi_query_attention
        projection = self.heads * self.head_dim
        qkv = projection + 2 * self.groups * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, qkv,
                                         bias=cfg.add_bias_linear or cfg.add_qkv_bias)
        self.dense = nn.Linear(projection, cfg.hidden_size, bias=cfg.add_bias_linear)
        self.native: ctypes.CDLL | None = None  # set by ChatGLM2Model.finish_loading (MQA only)

    def _split(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t = mixed.shape[:2]
        hd = self.head_dim
        if self.multi_query:
            q, k, v = mixed.split([self.heads * hd, self.groups * hd, self.groups * hd], dim=-1)
            return (q.view(b, t, self.heads, hd), k.view(b, t, self.groups, hd),
                    v.view(b, t, self.groups, hd))
        # Without MQA THUDM lays q, k, v out per head: [heads, 3 * head] (split_tensor_along_last_dim).
        q, k, v = mixed.view(b, t, self.heads, 3 * hd).split(hd, dim=-1)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: torch.Tensor, store: KVStore, layer: int,
                mask: torch.Tensor | None, is_causal: bool,
                attend: Attend | None = None) -> torch.Tensor:
        mixed = self.query_key_value(x)
        if self.native is not None:  # queries and keys rotated in place, in one call
            native.rotary_(self.native, mixed, self.heads + self.groups, self.head_dim, rope)
            q, k, v = self._split(mixed)
        else:
            q, k, v = self._split(mixed)
            q = apply_rotary(q, rope)
            k = apply_rotary(k, rope)
        if attend is not None:
            out = attend(layer, q, k, v)
            b, t = out.shape[:2]
            return self.dense(out.reshape(b, t, self.heads * self.head_dim))
        keys, values = store(layer, k, v)
        if q.shape[1] == 1:  # a decode step: see decode_attention for why not SDPA
            out = decode_attention(q, keys, values, mask)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=is_causal,
                enable_gqa=self.groups != self.heads,
            )
        b, _, t, _ = out.shape
        return self.dense(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size,
                                       bias=cfg.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size,
                                       bias=cfg.add_bias_linear)
        self.native: ctypes.CDLL | None = None  # set by ChatGLM2Model.finish_loading

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.dense_4h_to_h(native.swiglu(self.native, self.dense_h_to_4h(x)))
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # modeling_chatglm.py swiglu
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLM2Config):
        super().__init__()
        self.post_ln_residual = cfg.apply_residual_connection_post_layernorm
        self.input_layernorm = _norm(cfg)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, store: KVStore, layer: int,
                mask: torch.Tensor | None, is_causal: bool,
                attend: Attend | None = None) -> torch.Tensor:
        normed = self.input_layernorm(x)
        attn = self.self_attention(normed, rope, store, layer, mask, is_causal, attend)
        h = (normed if self.post_ln_residual else x) + attn
        normed = self.post_attention_layernorm(h)
        return (normed if self.post_ln_residual else h) + self.mlp(normed)


class Embedding(nn.Module):
    def __init__(self, cfg: ChatGLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)


class Encoder(nn.Module):
    def __init__(self, cfg: ChatGLM2Config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = _norm(cfg) if cfg.post_layer_norm else nn.Identity()


class Transformer(nn.Module):
    def __init__(self, cfg: ChatGLM2Config):
        super().__init__()
        self.embedding = Embedding(cfg)
        self.encoder = Encoder(cfg)
        self.output_layer: nn.Module = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)


# --------------------------------------------------------------------------- model


class ChatGLM2Model(nn.Module):
    """A :class:`adapters.family.CausalLM` for ChatGLM2/3.  Build it with :func:`load_model`."""

    def __init__(self, cfg: ChatGLM2Config):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.padded_vocab_size = cfg.padded_vocab_size
        self.context_length = cfg.seq_length
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.register_buffer("rope", torch.empty(0), persistent=False)

    def finish_loading(self, dtype: torch.dtype, device: torch.device) -> None:
        """Record where the weights live and compute the rotary table there."""
        self.dtype = dtype
        self.device = device
        self.rope = rope_table(self.context_length, self.config.kv_channels,
                               self.config.rope_ratio, dtype, device)
        # The output layer (kept in bf16 even in THUDM's int4/int8 checkpoints) runs with one row
        # per sequence: the native bf16 kernel streams it faster than oneDNN's GEMM (bench.kernels).
        t = self.transformer
        t.output_layer = native.NativeLinear.replacing(t.output_layer)
        # bf16 weights: the four linears of every layer too (the native kernel's rows are
        # batch-invariant and it streams the weights faster than oneDNN at few rows)
        use_native_linears(self, QUANT_LAYOUT)
        # bf16 on the CPU: the element-wise parts of each layer (norms, rotary, SwiGLU) run as one
        # native call each, reproducing torch's bf16 roundings (wq_gemm.c).
        lib = native.library() if dtype == torch.bfloat16 and device.type == "cpu" else None
        c = self.config
        for module in self.modules():
            # the kernels' vector widths: 16 values (norm, SwiGLU); rotary has no constraint
            if (isinstance(module, RMSNorm) and c.hidden_size % 16 == 0) or (
                    isinstance(module, MLP) and c.ffn_hidden_size % 16 == 0) or (
                    isinstance(module, SelfAttention) and module.multi_query):
                module.native = lib
        self.eval()
        self.requires_grad_(False)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache memory one position takes (keys + values, every layer)."""
        c = self.config
        return c.num_layers * 2 * c.kv_groups * c.kv_channels * self.dtype.itemsize

    def new_cache(self) -> ChatGLM2Cache:
        c = self.config
        return ChatGLM2Cache(c.num_layers, c.kv_groups, c.kv_channels, self.context_length,
                             self.dtype, self.device)

    def _run(self, ids: torch.Tensor, rope: torch.Tensor, store: KVStore,
             mask: torch.Tensor | None, is_causal: bool,
             attend: Attend | None = None, every: bool = False) -> torch.Tensor:
        t = self.transformer
        h = t.embedding.word_embeddings(ids)
        for i, layer in enumerate(t.encoder.layers):
            h = layer(h, rope, store, i, mask, is_causal, attend)
        h = t.encoder.final_layernorm(h if every else h[:, -1])
        return t.output_layer(h).float()

    def _attention_kernels(self) -> ctypes.CDLL | None:
        """The native library where its attention applies: bf16 on the CPU, kernels built."""
        lib = native.library()
        if lib is None or self.dtype != torch.bfloat16 or self.device.type != "cpu" \
                or self.config.kv_channels % native.ATTENTION_HEAD_MULTIPLE:
            return None
        return lib

    def _native_attend(self, caches: Sequence[ChatGLM2Cache],
                       lengths: Sequence[int] | None = None) -> Attend | None:
        """The native decode attention over ``caches`` (each reserved for this step), where it
        applies.  Used for solo and batched decode steps alike, so a sequence's tokens do not
        depend on what it is batched with.

        Row ``i`` attends over the first ``lengths[i]`` positions of ``caches[i]`` (default: its
        length + 1); a cache may appear in several rows (verifying drafted ids: one row per fed
        id), which works because the kernel stores every row's key/value before attending."""
        lib = self._attention_kernels()
        if lib is None:
            return None
        if lengths is None:
            lengths = [c.length + 1 for c in caches]
        batch = native.DecodeBatch([c.storage for c in caches], list(lengths))

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return native.decode_attention(lib, batch, layer, q, k, v).transpose(1, 2)

        return attend

    def _native_prefill(self, cache: ChatGLM2Cache, n: int) -> Attend | None:
        """The native attention of ``n`` new positions of one sequence (a prefill chunk; its
        cache reserved for them): each query as a decode step of that position computes it, so
        a prompt's logits do not depend on how the engine split it into chunks, nor on the
        other prompts prefilled in the same step (SDPA's blocking depends on the lengths)."""
        lib = self._attention_kernels()
        if lib is None:
            return None
        lengths = torch.arange(cache.length + 1, cache.length + n + 1)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.write(layer, k[0].transpose(0, 1), v[0].transpose(0, 1))
            return native.prefill_attention(lib, cache.storage, layer, q[0], lengths).unsqueeze(0)

        return attend

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], cache: KVCache,  # type: ignore[override]
                every_position: bool = False) -> torch.Tensor:
        """Append ``ids`` to ``cache``; float32 logits ``[padded_vocab]`` of the last position
        (``[len(ids), padded_vocab]`` of every position with ``every_position``).

        Prefill (many ids) and decode (one id) take the same path; a prefill that continues a
        non-empty cache gets an explicit causal mask offset by the cached length.
        """
        cache = own(cache, ChatGLM2Cache)
        n = len(ids)
        if n == 0:
            raise ValueError("forward needs at least one id")
        start = cache.length
        cache.reserve(n)
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        rope = self.rope[start:start + n].unsqueeze(0)
        mask = None
        if start > 0 and n > 1:
            q_pos = torch.arange(start, start + n, device=self.device).unsqueeze(1)
            mask = torch.arange(start + n, device=self.device).unsqueeze(0) <= q_pos

        def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = cache.write(layer, k[0].transpose(0, 1), v[0].transpose(0, 1))
            return keys.unsqueeze(0), values.unsqueeze(0)

        attend = self._native_attend([cache]) if n == 1 else self._native_prefill(cache, n)
        logits = self._run(tokens, rope, store, mask, is_causal=start == 0 and n > 1,
                           attend=attend, every=every_position)
        cache.commit(n)
        return logits[0]

    @torch.inference_mode()
    def forward_batch(self, ids_per_seq: Sequence[Sequence[int]],
                      caches: Sequence[KVCache], every_position: bool = False) -> torch.Tensor:
        """Decode one new id per sequence in one pass; float32 logits ``[B, padded_vocab]``.

        Sequences may have different cached lengths: their histories are right-padded to the
        longest and the padding is masked out, so each row equals a solo :meth:`forward`.

        With ``every_position`` a sequence may bring several ids (a decode step verifying
        drafted ids): the logits after every fed id, ``[sum of the id counts, padded_vocab]``
        in order, each row computed as a one-id decode step at that position computes it.
        """
        if every_position:
            return self._forward_rows(ids_per_seq, batch_caches(
                ids_per_seq, caches, ChatGLM2Cache, several=True))
        owned = batch_caches(ids_per_seq, caches, ChatGLM2Cache)
        for cache in owned:
            cache.reserve(1)
        starts = [c.length for c in owned]
        total = max(starts) + 1
        tokens = torch.tensor([[ids[0]] for ids in ids_per_seq], dtype=torch.long,
                              device=self.device)
        rope = self.rope[torch.tensor(starts, device=self.device)].unsqueeze(1)
        lengths = torch.tensor(starts, device=self.device) + 1
        mask = (torch.arange(total, device=self.device).unsqueeze(0) < lengths.unsqueeze(1))
        mask = mask[:, None, None, :]  # [B, 1, 1, L]: broadcast over heads and the query
        c = self.config
        batch = len(caches)

        def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys = torch.zeros(batch, c.kv_groups, total, c.kv_channels, dtype=k.dtype,
                               device=k.device)
            values = torch.zeros_like(keys)
            for b, cache in enumerate(owned):
                kb, vb = cache.write(layer, k[b].transpose(0, 1), v[b].transpose(0, 1))
                keys[b, :, : kb.shape[1]] = kb
                values[b, :, : vb.shape[1]] = vb
            return keys, values

        logits = self._run(tokens, rope, store, mask, is_causal=False,
                           attend=self._native_attend(owned))
        for cache in owned:
            cache.commit(1)
        return logits

    def _forward_rows(self, ids_per_seq: Sequence[Sequence[int]],
                      owned: Sequence[ChatGLM2Cache]) -> torch.Tensor:
        """:meth:`forward_batch` with every position: each fed id is a row of its own (a
        ``[N, 1]`` batch) attending over its cache up to itself, so every row is computed by
        the one-query decode attention, and row-wise layers see the rows of a decode step."""
        counts = [len(ids) for ids in ids_per_seq]
        for cache, n in zip(owned, counts, strict=True):
            cache.reserve(n)
        starts = [c.length for c in owned]
        positions = [s + j for s, n in zip(starts, counts, strict=True) for j in range(n)]
        tokens = torch.tensor([[int(t)] for ids in ids_per_seq for t in ids], dtype=torch.long,
                              device=self.device)
        rope = self.rope[torch.tensor(positions, device=self.device)].unsqueeze(1)
        row_caches = [c for c, n in zip(owned, counts, strict=True) for _ in range(n)]
        attend = self._native_attend(row_caches, [p + 1 for p in positions]) \
            or self._rows_attend(owned, counts)
        logits = self._run(tokens, rope, _no_store, None, is_causal=False, attend=attend)
        for cache, n in zip(owned, counts, strict=True):
            cache.commit(n)
        return logits

    def _rows_attend(self, owned: Sequence[ChatGLM2Cache], counts: Sequence[int]) -> Attend:
        """Torch attention for :meth:`_forward_rows`: each sequence's new keys/values go to its
        cache, then each of its rows attends (:func:`decode_attention`) up to its position."""

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outs, row = [], 0
            for cache, n in zip(owned, counts, strict=True):
                rows = slice(row, row + n)
                keys, values = cache.write(layer, k[rows, 0].transpose(0, 1),
                                           v[rows, 0].transpose(0, 1))
                total = keys.shape[1]
                upto = torch.arange(total - n + 1, total + 1, device=keys.device)
                mask = torch.arange(total, device=keys.device)[None, :] < upto[:, None]
                outs.append(decode_attention(q[rows], keys.expand(n, *keys.shape),
                                             values.expand(n, *values.shape),
                                             mask[:, None, None, :]))
                row += n
            return torch.cat(outs).transpose(1, 2)  # [N, 1, heads, hd], as Attend returns

        return attend


def _no_store(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``store`` of a pass whose ``attend`` callback writes the caches itself (never called:
    attention takes the ``attend`` branch)."""
    raise AssertionError("an attend callback stores the keys and values itself")


# --------------------------------------------------------------------------- loading


def load_model(folder: Path, config: ChatGLM2Config, *, dtype: torch.dtype,
               device: torch.device | str, quantize: str | None = None) -> ChatGLM2Model:
    """Build the model on the ``meta`` device, then stream the checkpoint's tensors into it one
    by one (converted to ``dtype`` on ``device``), so two copies of the weights never coexist.

    ``rotary_pos_emb.inv_freq`` is ignored (recomputed); any other unknown, duplicate, missing
    or mis-shaped tensor is a :class:`CheckpointError`.
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = ChatGLM2Model(config)
    # modeling_chatglm.py recomputes rotary_pos_emb.inv_freq; the stored copy is fp16-rounded
    count = load_weights(model, Path(folder), QUANT_LAYOUT,
                         quantization_bit=config.quantization_bit, quantize=quantize,
                         dtype=dtype, device=device,
                         consume=lambda name, _: name.endswith("rotary_pos_emb.inv_freq"))
    model.finish_loading(dtype, device)
    logger.info("loaded %s: %d tensors as %s on %s", folder, count, dtype, device)
    return model
