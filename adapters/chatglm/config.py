"""ChatGLM-6B (v1) ``config.json`` as a frozen dataclass.

The keys are THUDM's (``configuration_chatglm.py`` of THUDM/chatglm-6b); defaults are that
file's defaults, used when a key is absent.  A present key of the wrong type is an error naming
the key, never a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.weights.checkpoint import CheckpointError, config_value, read_json

_TORCH_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ChatGLMConfig:
    """What the v1 model and its loader need from ``config.json``."""

    vocab_size: int = 150528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int = 130004
    eos_token_id: int = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int = 3
    quantization_bit: int = 0
    quantization_embeddings: bool = False
    torch_dtype: str = "float16"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        return self.max_sequence_length


_DEFAULTS = ChatGLMConfig()


def read_config(folder: Path) -> ChatGLMConfig:
    """Read and validate ``folder/config.json`` of a ChatGLM-6B checkpoint."""
    source = Path(folder) / "config.json"
    data = read_json(source)
    fields = {
        "vocab_size": int, "hidden_size": int, "num_layers": int, "num_attention_heads": int,
        "inner_hidden_size": int, "layernorm_epsilon": float, "max_sequence_length": int,
        "position_encoding_2d": bool, "bos_token_id": int, "eos_token_id": int,
        "mask_token_id": int, "gmask_token_id": int, "pad_token_id": int,
        "quantization_bit": int, "quantization_embeddings": bool, "torch_dtype": str,
    }
    values = {key: config_value(data, key, kind, source, getattr(_DEFAULTS, key)) for key, kind in fields.items()}
    config = ChatGLMConfig(**values)
    _validate(config, source)
    return config


def _validate(config: ChatGLMConfig, source: Path) -> None:
    for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                "inner_hidden_size", "max_sequence_length"):
        if getattr(config, key) <= 0:
            raise CheckpointError(f"{source}: key '{key}' must be positive, got "
                                  f"{getattr(config, key)}")
    # 2-D rotary splits each head in two halves and rotates each half in pairs (x, x + d/4).
    divisor = 4 * config.num_attention_heads if config.position_encoding_2d else 2 * config.num_attention_heads
    if config.hidden_size % divisor:
        raise CheckpointError(
            f"{source}: key 'hidden_size' ({config.hidden_size}) must be a multiple of "
            f"{divisor} for {config.num_attention_heads} heads"
        )
    if config.quantization_bit not in (0, 4, 8):
        raise CheckpointError(
            f"{source}: key 'quantization_bit' must be 0, 4 or 8, got {config.quantization_bit}"
        )
    if config.torch_dtype not in _TORCH_DTYPES:
        raise CheckpointError(
            f"{source}: key 'torch_dtype' must be one of {_TORCH_DTYPES}, got {config.torch_dtype!r}"
        )
    for key in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id"):
        value = getattr(config, key)
        if not 0 <= value < config.vocab_size:
            raise CheckpointError(
                f"{source}: key '{key}' ({value}) is outside the vocabulary (0..{config.vocab_size - 1})"
            )


def claims(folder: Path, config: dict[str, Any]) -> bool:
    """ChatGLM-6B's config.json has keys of its own (``configuration_chatglm.py`` of chatglm-6b)."""
    return "position_encoding_2d" in config or "inner_hidden_size" in config
