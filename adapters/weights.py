"""Stream a checkpoint's tensors into a model built on the ``meta`` device.

Each tensor is converted to the model's dtype/device and set as the parameter, then dropped, so
two copies of the weights never coexist; the four linears of each layer go through
:class:`adapters.quant.QuantizedLinearLoader` when the folder is pre-quantized or ``quantize`` is
set.  Unknown, duplicate, missing or mis-shaped tensors are a :class:`CheckpointError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adapters.checkpoint import CheckpointError, iter_tensors
from adapters.quant import QuantizedLinearLoader, loading_progress

logger = logging.getLogger(__name__)


def load_weights(
    model: nn.Module,
    folder: Path,
    family: str,
    *,
    quantization_bit: int,
    quantize: str | None,
    dtype: torch.dtype,
    device: torch.device,
    consume: Callable[[str, torch.Tensor], bool] = lambda name, tensor: False,
) -> int:
    """Fill every parameter of ``model`` from ``folder``; returns the number of tensors set.
    ``consume(name, tensor)`` returning True means the caller took (or skips) that tensor."""
    folder = Path(folder)
    quant = QuantizedLinearLoader.for_config(model, family, quantization_bit, quantize,
                                             dtype=dtype, device=device)
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in loading_progress(folder, iter_tensors(folder), "loading"):
        if consume(name, tensor):
            continue
        if quant is not None and quant.take(name, tensor):
            continue
        if name in loaded:
            raise CheckpointError(f"{folder}: tensor {name} appears twice")
        param = expected.get(name)
        if param is None:
            raise CheckpointError(f"{folder}: unexpected tensor {name} for this config")
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{folder}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(param.shape)}"
            )
        module_name, _, attr = name.rpartition(".")
        value = torch.empty(param.shape, dtype=dtype, device=device)
        value.copy_(tensor)
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(
            value, requires_grad=False)
        loaded.add(name)
        del tensor
    if quant is not None:
        loaded |= quant.finish()
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks tensors {missing}")
    return len(loaded)
