"""Read a THUDM checkpoint folder without executing anything from it.

Supported layouts (as published on the hub):

* ``pytorch_model.bin``                                   single pickle file
* ``pytorch_model-0000N-of-0000M.bin`` + ``pytorch_model.bin.index.json``
* ``model.safetensors`` or ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``

``.bin`` files are read with ``torch.load(weights_only=True, mmap=True)`` (no code from the
pickle runs) and safetensors with mmap, one shard at a time, so a loader that copies each tensor
into its module and drops the reference never holds two copies of the weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class CheckpointError(Exception):
    """The folder is not a readable ChatGLM checkpoint."""


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def shard_files(folder: Path) -> list[Path]:
    """The weight files of ``folder`` in a stable order (index order when there is an index)."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).exists()]
            if missing:
                raise CheckpointError(f"{folder}: shards listed in {index_name} are missing: {missing}")
            return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if found:
        return found
    raise CheckpointError(
        f"{folder} holds no weights (expected pytorch_model*.bin or *.safetensors files)"
    )


def _iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)
        return
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Files written with the legacy (non-zip) serializer cannot be memory-mapped.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    for name in list(state.keys()):
        yield name, state.pop(name)


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint, one shard at a time.

    Tensors are CPU tensors in their stored dtype (memory-mapped where the format allows).
    The caller should convert/copy each tensor and drop it before asking for the next shard.
    """
    for path in shard_files(Path(folder)):
        logger.debug("reading %s", path.name)
        yield from _iter_file(path)


def total_size(folder: Path) -> int:
    """Bytes on disk of the weight files (for progress bars)."""
    return sum(p.stat().st_size for p in shard_files(Path(folder)))
