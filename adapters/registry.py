"""The one table of families, which family a checkpoint folder is, and how to load it as a served
``ChatModel``.

Families are rows (:class:`~adapters.family.FamilySpec`) in :data:`FAMILIES`, the only place a
family is named; a folder is matched by what its own metadata says (each row's ``claims``: the
rows are asked in order), overridable per model with ``family=``.  Adding a family is a folder
and a row here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapters import chatglm, chatglm2
from adapters.base import ModelInfo
from adapters.chat_model import TorchChatModel
from adapters.conversation import SystemPolicy
from adapters.family import FamilySpec
from adapters.runtime.dtypes import resolve_device, resolve_dtype
from adapters.runtime.speculative import SpeculativeConfig
from adapters.weights.activations import enable_int8_activations
from adapters.weights.checkpoint import CheckpointError, read_json, total_size

logger = logging.getLogger(__name__)

#: Every served family by the name ``family=`` and ``/v1/models`` use, in detection order.
FAMILIES: dict[str, FamilySpec] = {
    "chatglm": chatglm.SPEC,
    "chatglm3": chatglm2.V3_SPEC,
    "chatglm2": chatglm2.V2_SPEC,
}


def detect_family(folder: Path) -> str:
    """The name of the first family whose row claims ``folder``."""
    config = read_json(Path(folder) / "config.json")
    for name, spec in FAMILIES.items():
        if spec.claims(Path(folder), config):
            return name
    raise CheckpointError(
        f"{folder}/config.json does not look like a ChatGLM checkpoint "
        "(no position_encoding_2d or padded_vocab_size); pass family= to say which it is"
    )


def load_chat_model(
    model_id: str,
    path: str | Path,
    *,
    family: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    quantize: str | None = None,
    int8_activations: bool = False,
    system_policy: SystemPolicy = "prepend",
    max_running: int = 8,
    max_waiting: int = 64,
    kv_cache_bytes: int | None = None,
    prefix_cache: bool = True,
    prefill_chunk: int = 512,
    speculative: Mapping[str, Any] | None = None,
    description: str = "",
    machine_share: float = 1.0,
) -> TorchChatModel:
    """Load the checkpoint folder ``path`` and start its engine thread.

    ``kv_cache_bytes`` bounds the KV memory of running requests plus the prefix-reuse store
    (default: a quarter of the machine's RAM on CPU, capped at 8 GiB, times ``machine_share``:
    see :func:`default_kv_bytes`).  ``int8_activations``:
    the opt-in int8-activation path (:mod:`adapters.weights.activations`).  ``speculative``: the
    options of :class:`~adapters.runtime.speculative.SpeculativeConfig` (None: no speculation).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"model '{model_id}': {folder} is not a folder")
    name = family or detect_family(folder)
    if name not in FAMILIES:
        raise CheckpointError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
    spec = FAMILIES[name]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, total_size(folder))
    started = time.monotonic()
    config = spec.read_config(folder)
    tokenizer = spec.load_tokenizer(folder)
    model = spec.load_model(folder, config, dtype=dt, device=dev, quantize=quantize)
    bits = getattr(config, "quantization_bit", 0)
    quant = quantize or (f"{bits} (THUDM pre-quantized)" if bits else "none")
    extra: dict[str, object] = {"dtype": str(dt).removeprefix("torch."), "device": str(dev),
                                "quantization": quant}
    if int8_activations:
        extra["int8_activations_layers"] = enable_int8_activations(model)
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
        extra=extra,
    )
    return TorchChatModel(
        info, spec, tokenizer, model,
        system_policy=system_policy, max_running=max_running, max_waiting=max_waiting,
        kv_cache_bytes=kv_cache_bytes if kv_cache_bytes is not None
        else default_kv_bytes(dev, machine_share),
        prefix_cache=prefix_cache, prefill_chunk=prefill_chunk,
        speculative=None if speculative is None else SpeculativeConfig(**speculative),
    )


def default_kv_bytes(device: torch.device, machine_share: float = 1.0) -> int:
    """The KV-cache budget when none is set: half the free memory of a GPU; on the CPU a quarter
    of the machine's RAM (at most 8 GiB), times ``machine_share``, the part of the machine this
    process is given (a Ray replica's CPUs over its node's: replicas placed on one node then
    share one quarter instead of taking a quarter each and running the node out of memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not every platform reports it
        total = 16 * 1024**3
    return int(min(total // 4, 8 * 1024**3) * min(max(machine_share, 0.0), 1.0))
