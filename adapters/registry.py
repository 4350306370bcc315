"""Which family a checkpoint folder is, and how to load it as a served ``ChatModel``.

Families are rows (``FamilySpec``) in ``FAMILIES``; a folder is matched by what its own config.json says
(ChatGLM-6B has ``position_encoding_2d``; ChatGLM2/3 have ``padded_vocab_size`` and tell v3 apart by
their recorded name), overridable per model with ``family=``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from adapters.base import ModelInfo
from adapters.chat_model import TorchChatModel
from adapters.checkpoint import CheckpointError, read_json, total_size
from adapters.conversation import SystemPolicy
from adapters.family import FamilySpec

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def families() -> dict[str, FamilySpec]:
    from adapters.chatglm import CHATGLM
    from adapters.chatglm2 import CHATGLM2, CHATGLM3

    return {spec.name: spec for spec in (CHATGLM, CHATGLM2, CHATGLM3)}


def detect_family(folder: Path) -> str:
    config = read_json(Path(folder) / "config.json")
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        return "chatglm"
    if "padded_vocab_size" in config or "multi_query_attention" in config:
        from adapters.chatglm2.config import detect_version

        return detect_version(Path(folder))
    raise CheckpointError(
        f"{folder}/config.json does not look like a ChatGLM checkpoint "
        "(no position_encoding_2d or padded_vocab_size); pass family= to say which it is"
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, weight_bytes: int) -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or auto")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On a CPU, float32 doubles the memory of an fp16 checkpoint: keep it for small models only.
    return torch.float32 if weight_bytes < 2 * 1024**3 else torch.bfloat16


def load_chat_model(
    model_id: str,
    path: str | Path,
    *,
    family: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    quantize: str | None = None,
    system_policy: SystemPolicy = "prepend",
    max_running: int = 8,
    max_waiting: int = 64,
    kv_cache_bytes: int | None = None,
    prefix_cache: bool = True,
    prefill_chunk: int = 512,
    description: str = "",
) -> TorchChatModel:
    """Load the checkpoint folder ``path`` and start its engine thread.

    ``kv_cache_bytes`` bounds the KV memory of running requests plus the prefix-reuse store
    (default: a quarter of the machine's RAM on CPU, capped at 8 GiB).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"model '{model_id}': {folder} is not a folder")
    specs = families()
    name = family or detect_family(folder)
    if name not in specs:
        raise CheckpointError(f"unknown family {name!r}; choose one of {sorted(specs)}")
    spec = specs[name]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, total_size(folder))
    started = time.monotonic()
    config = spec.read_config(folder)
    tokenizer = spec.load_tokenizer(folder)
    model = spec.load_model(folder, config, dtype=dt, device=dev, quantize=quantize)
    bits = getattr(config, "quantization_bit", 0)
    quant = quantize or (f"{bits} (THUDM pre-quantized)" if bits else "none")
    logger.info(
        "model '%s' loaded: family=%s dtype=%s device=%s quantization=%s context=%d in %.1fs",
        model_id, name, str(dt).removeprefix("torch."), dev, quant, model.context_length,
        time.monotonic() - started,
    )
    info = ModelInfo(
        id=model_id,
        family=name,
        context_length=model.context_length,
        description=description or spec.description,
        extra={"dtype": str(dt).removeprefix("torch."), "device": str(dev), "quantization": quant},
    )
    return TorchChatModel(
        info, spec, tokenizer, model,
        system_policy=system_policy, max_running=max_running, max_waiting=max_waiting,
        kv_cache_bytes=kv_cache_bytes if kv_cache_bytes is not None else default_kv_bytes(dev),
        prefix_cache=prefix_cache, prefill_chunk=prefill_chunk,
    )


def default_kv_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not every platform reports it
        return 4 * 1024**3
    return min(total // 4, 8 * 1024**3)
