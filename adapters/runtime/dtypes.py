"""The compute dtypes a model can run in, by the names the command line and config files use."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device | None = None, weight_bytes: int = 0
) -> torch.dtype:
    """A dtype by name or as is (one of :data:`DTYPES`), or ``"auto"``: bfloat16 (float16 where
    the GPU has no bf16) on CUDA; on a CPU float32 for checkpoints under 2 GB, whose memory
    doubling does not matter, and bfloat16 above."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or auto")
        return DTYPES[dtype]
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32 if weight_bytes < 2 * 1024**3 else torch.bfloat16


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
