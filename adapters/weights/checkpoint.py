"""Read a THUDM checkpoint folder without executing anything from it.

Supported layouts (as published on the hub):

* ``pytorch_model.bin``                                   single pickle file
* ``pytorch_model-0000N-of-0000M.bin`` + ``pytorch_model.bin.index.json``
* ``model.safetensors`` or ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``

``.bin`` files are read with ``torch.load(weights_only=True, mmap=True)`` (no code from the
pickle runs); safetensors files are read tensor by tensor with plain reads (their header says where
each tensor lies).  A loader that copies each tensor into its module and drops the reference never
holds two copies of the weights.

Resident memory: pages of a memory-mapped file count in the process's RSS for as long as the
mapping lives, so a 4 GB ``pytorch_model.bin`` would add 4 GB to the peak while it loads.  After each
``.bin`` tensor has been consumed its pages are handed back with ``madvise(MADV_DONTNEED)`` (safe on
the read-only private mapping torch makes: a later access re-reads the file), and safetensors are
not mapped at all.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only (not musl)


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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The safetensors format: an 8-byte little-endian header size, a JSON header of
    ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(size))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from exc
        base = 8 + size
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            start, end = info["data_offsets"]
            shape = info["shape"]
            expected = dtype.itemsize * int(torch.Size(shape).numel())
            if end - start != expected:
                raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes for shape "
                                      f"{shape}")
            if expected == 0:
                tensor = torch.empty(shape, dtype=dtype)
            else:
                buffer = bytearray(expected)  # the tensor below shares this memory: no copy
                f.seek(base + start)
                if f.readinto(buffer) != expected:
                    raise CheckpointError(f"{path}: file ends inside tensor {name}")
                tensor = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)
            yield name, tensor


def _release_pages(tensor: torch.Tensor) -> None:
    """Give the pages of a memory-mapped tensor back to the kernel (Linux; no-op elsewhere)."""
    if _LIBC is None or tensor.nbytes < _PAGE:
        return
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    first = (start + _PAGE - 1) // _PAGE * _PAGE  # whole pages inside this storage only
    last = end // _PAGE * _PAGE
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def _iter_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    mapped = True
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Files written with the legacy (non-zip) serializer cannot be memory-mapped.
        state, mapped = torch.load(str(path), map_location="cpu", weights_only=True), False
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    for name in list(state.keys()):
        tensor = state.pop(name)
        yield name, tensor
        if mapped:
            _release_pages(tensor)


def _iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        return _iter_safetensors(path)
    return _iter_bin(path)


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint, one shard at a time.

    Tensors are CPU tensors in their stored dtype (memory-mapped where the format allows).
    The caller should convert/copy each tensor and drop it before asking for the next shard.
    """
    for path in shard_files(Path(folder)):
        logger.debug("reading %s", path.name)
        yield from _iter_file(path)
        release_free_memory()


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Loading frees many large temporary buffers (a shard's tensors, unpacked int4 values); glibc
    keeps freed blocks below its dynamic mmap threshold in the heap, which measured +1.2 GiB of
    resident memory after loading a ChatGLM2-6B int4 folder.  Trimming after each shard keeps the
    process at what it really holds.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def total_size(folder: Path) -> int:
    """Bytes on disk of the weight files (for progress bars)."""
    return sum(p.stat().st_size for p in shard_files(Path(folder)))


def config_value(data: dict[str, Any], key: str, kind: type, source: Path,
                 default: Any = None) -> Any:
    """``data[key]`` checked to be a ``kind`` (bool, int, float, str), or ``default`` when it is
    absent or null; absent without a default is a :class:`CheckpointError` naming the key."""
    if key not in data or data[key] is None:
        if default is not None:
            return default
        raise CheckpointError(f"{source}: required key '{key}' is missing")
    value = data[key]
    # bool is an int subclass: a JSON true must not pass as a size, nor 1 as a flag.
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise CheckpointError(
            f"{source}: key '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value
