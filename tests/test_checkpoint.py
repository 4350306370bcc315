from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.weights.checkpoint import CheckpointError, iter_tensors, shard_files


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g).half(),
        "b.weight": torch.randn(5, 8, generator=g).to(torch.bfloat16),
        "c.q": torch.randint(-7, 8, (16, 4), generator=g, dtype=torch.int8),
        "d.scalar": torch.tensor(3.5),
        "e.big": torch.randn(512, 1024, generator=g),  # spans many pages
        "f.empty": torch.empty(0, 4),
    }


def test_safetensors_read_without_mapping_equals_the_library(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = dict(iter_tensors(tmp_path))
    theirs = load_file(str(tmp_path / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


def test_bin_tensors_stay_valid_after_their_pages_are_released(tmp_path: Path) -> None:
    torch.save(_tensors(), tmp_path / "pytorch_model.bin")
    kept = dict(iter_tensors(tmp_path))  # references kept past their release
    for name, t in _tensors().items():
        assert torch.equal(kept[name], t), name


def test_sharded_index_order_and_missing_shard(tmp_path: Path) -> None:
    t = _tensors()
    save_file({"a.weight": t["a.weight"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": t["b.weight"]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [p.name for p in shard_files(tmp_path)] == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]
    assert [n for n, _ in iter_tensors(tmp_path)] == ["a.weight", "b.weight"]
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        shard_files(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="ends inside"):
        list(iter_tensors(tmp_path))


def test_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no weights"):
        shard_files(tmp_path)
