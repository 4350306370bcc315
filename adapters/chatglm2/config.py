"""ChatGLM2-6B / ChatGLM3-6B ``config.json`` (THUDM's ``configuration_chatglm.py`` keys) and the
v2-or-v3 decision, both read from the checkpoint folder's own metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapters.weights.checkpoint import CheckpointError, config_value, read_json

Version = Literal["chatglm2", "chatglm3"]

_DTYPES = ("float32", "float16", "bfloat16")
#: The role tokens ChatGLM3's tokenizer adds in code (tokenization_chatglm.py of chatglm3-6b).
_V3_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


@dataclass(frozen=True)
class ChatGLM2Config:
    """The architecture of a ChatGLM2/3 checkpoint.  Field names are THUDM's config.json keys."""

    padded_vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    kv_channels: int
    multi_query_attention: bool
    multi_query_group_num: int
    ffn_hidden_size: int
    add_qkv_bias: bool
    add_bias_linear: bool
    rmsnorm: bool
    post_layer_norm: bool
    layernorm_epsilon: float
    seq_length: int
    eos_token_id: int
    pad_token_id: int
    torch_dtype: str
    apply_residual_connection_post_layernorm: bool
    rope_ratio: float = 1.0
    quantization_bit: int = 0

    @property
    def kv_groups(self) -> int:
        """Key/value heads: the MQA group count, or one per attention head without MQA."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def context_length(self) -> int:
        return self.seq_length


def read_config(folder: Path) -> ChatGLM2Config:
    """Read ``folder/config.json``; a missing or ill-typed key is a :class:`CheckpointError`
    naming it."""
    source = Path(folder) / "config.json"
    data = read_json(source)
    cfg = ChatGLM2Config(
        padded_vocab_size=config_value(data, "padded_vocab_size", int, source),
        hidden_size=config_value(data, "hidden_size", int, source),
        num_layers=config_value(data, "num_layers", int, source),
        num_attention_heads=config_value(data, "num_attention_heads", int, source),
        kv_channels=config_value(data, "kv_channels", int, source),
        multi_query_attention=config_value(data, "multi_query_attention", bool, source),
        multi_query_group_num=config_value(data, "multi_query_group_num", int, source),
        ffn_hidden_size=config_value(data, "ffn_hidden_size", int, source),
        add_qkv_bias=config_value(data, "add_qkv_bias", bool, source),
        add_bias_linear=config_value(data, "add_bias_linear", bool, source),
        rmsnorm=config_value(data, "rmsnorm", bool, source),
        post_layer_norm=config_value(data, "post_layer_norm", bool, source),
        layernorm_epsilon=config_value(data, "layernorm_epsilon", float, source),
        seq_length=config_value(data, "seq_length", int, source),
        eos_token_id=config_value(data, "eos_token_id", int, source),
        pad_token_id=config_value(data, "pad_token_id", int, source),
        torch_dtype=config_value(data, "torch_dtype", str, source),
        apply_residual_connection_post_layernorm=config_value(
            data, "apply_residual_connection_post_layernorm", bool, source
        ),
        rope_ratio=config_value(data, "rope_ratio", float, source, default=1.0),
        quantization_bit=config_value(data, "quantization_bit", int, source, default=0),
    )
    _validate(cfg, source)
    return cfg


def _validate(cfg: ChatGLM2Config, source: Path) -> None:
    positive = ("padded_vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                "kv_channels", "ffn_hidden_size", "seq_length")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise CheckpointError(f"{source}: key '{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.multi_query_attention and (
        cfg.multi_query_group_num <= 0 or cfg.num_attention_heads % cfg.multi_query_group_num
    ):
        raise CheckpointError(
            f"{source}: key 'multi_query_group_num' ({cfg.multi_query_group_num}) must divide "
            f"num_attention_heads ({cfg.num_attention_heads})"
        )
    if cfg.kv_channels % 4:
        # Rotary covers half the head in (even, odd) pairs (modeling_chatglm.py RotaryEmbedding).
        raise CheckpointError(f"{source}: key 'kv_channels' must be a multiple of 4")
    if cfg.torch_dtype not in _DTYPES:
        raise CheckpointError(f"{source}: key 'torch_dtype' must be one of {_DTYPES}, got "
                              f"{cfg.torch_dtype!r}")
    if cfg.quantization_bit not in (0, 4, 8):
        raise CheckpointError(f"{source}: key 'quantization_bit' must be 0, 4 or 8, got "
                              f"{cfg.quantization_bit}")
    if cfg.rope_ratio <= 0:
        raise CheckpointError(f"{source}: key 'rope_ratio' must be positive")


def _says_v3(value: object) -> bool:
    return isinstance(value, str) and "chatglm3" in value.lower()


def detect_version(folder: Path) -> Version:
    """``"chatglm3"`` when the folder's own metadata says so, else ``"chatglm2"``.

    Signals: ``_name_or_path`` in config.json, ``name_or_path`` in tokenizer_config.json (real
    ChatGLM3 folders say ``THUDM/chatglm3-6b*``), a ``chat_template`` or added tokens naming
    ChatGLM3's role tokens.  v2 and v3 share weights layout and tokenizer file, so nothing
    else can tell them apart.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if config_path.exists() and _says_v3(read_json(config_path).get("_name_or_path")):
        return "chatglm3"
    tok_path = folder / "tokenizer_config.json"
    if tok_path.exists():
        tok = read_json(tok_path)
        if _says_v3(tok.get("name_or_path")):
            return "chatglm3"
        template = tok.get("chat_template")
        if isinstance(template, str) and any(t in template for t in _V3_ROLE_TOKENS):
            return "chatglm3"
        added = tok.get("added_tokens_decoder")
        if isinstance(added, dict):
            contents = {v.get("content") for v in added.values() if isinstance(v, dict)}
            if contents & set(_V3_ROLE_TOKENS):
                return "chatglm3"
    for name in ("added_tokens.json", "special_tokens_map.json"):
        path = folder / name
        if path.exists() and any(t in path.read_text(encoding="utf-8") for t in _V3_ROLE_TOKENS):
            return "chatglm3"
    return "chatglm2"


def is_chatglm2_architecture(config: dict[str, Any]) -> bool:
    """ChatGLM2/3 config.json keys (``configuration_chatglm.py`` of chatglm2-6b / chatglm3-6b)."""
    return "padded_vocab_size" in config or "multi_query_attention" in config


def claims_v2(folder: Path, config: dict[str, Any]) -> bool:
    return is_chatglm2_architecture(config) and detect_version(folder) == "chatglm2"


def claims_v3(folder: Path, config: dict[str, Any]) -> bool:
    return is_chatglm2_architecture(config) and detect_version(folder) == "chatglm3"
