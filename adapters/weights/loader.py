"""Stream a checkpoint's tensors into a model built on the ``meta`` device.

Each tensor is converted to the model's dtype/device and set as the parameter, then dropped, so
two copies of the weights never coexist; the four linears of each layer go through
:class:`QuantizedLinearLoader` when the folder is pre-quantized or ``quantize`` is set.  Unknown, duplicate, missing or mis-shaped tensors are a :class:`CheckpointError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from adapters.weights.checkpoint import CheckpointError, iter_tensors, total_size
from adapters.weights.format import QUANT_SCHEMES, QuantLayout
from adapters.weights.layers import from_thudm, quantize_weight

logger = logging.getLogger(__name__)


def load_weights(
    model: nn.Module,
    folder: Path,
    layout: QuantLayout,
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
    quant = QuantizedLinearLoader.for_config(model, layout, quantization_bit, quantize,
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




@dataclass
class _Pending:
    linear: nn.Linear  # the meta-device placeholder: its shapes say what to expect
    parts: dict[str, torch.Tensor]


class QuantizedLinearLoader:
    """Swaps the four linears of each layer for quantised ones while a checkpoint streams in.

    A model loader hands every ``(name, tensor)`` to :meth:`take` first.  Tensors of a quantised
    linear are kept only until that linear is complete (its parts are adjacent in THUDM's
    files), then turned into an :class:`Int8Linear` / :class:`Int4Linear` on ``device`` and set
    on the model.  With ``bits`` (a THUDM pre-quantised folder) the parts are ``weight`` (int8),
    ``weight_scale`` and ``bias``; with ``mode`` (quantise on load) ``weight`` and ``bias`` in
    full precision, quantised as they arrive: the full-precision model never exists.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: QuantLayout,
        *,
        bits: int = 0,
        mode: str | None = None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if bool(bits) == (mode is not None):
            raise ValueError("give exactly one of bits (pre-quantised folder) or mode")
        if mode is not None and mode not in QUANT_SCHEMES:
            raise ValueError(f"unknown quantization mode {mode!r}; known: {sorted(QUANT_SCHEMES)}")
        self.model, self.layout, self.bits, self.mode = model, layout, bits, mode
        self.dtype, self.device = dtype, device
        # A float32 model is the reference-precision mode: its layers dequantise per call in
        # float32 (matches THUDM's fp32 logits to ~1e-4).  The bf16 kernels would round every
        # activation to bf16, which moves logprobs as much as a bf16 model does (up to ~0.3 on
        # the tiny reference checkpoints); bf16/fp16 models take the kernels.
        self.kernel = False if dtype == torch.float32 else None
        self._pending: dict[str, _Pending] = {}
        self._done: set[str] = set()
        self._replaced: set[str] = set()

    @classmethod
    def for_config(
        cls,
        model: nn.Module,
        layout: QuantLayout,
        quantization_bit: int,
        quantize: str | None,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> QuantizedLinearLoader | None:
        """The loader a checkpoint needs, or ``None`` for a plain full-precision load."""
        if quantization_bit and quantize is not None:
            raise ValueError(
                f"the checkpoint is already quantised to int{quantization_bit}; "
                f"quantize={quantize!r} cannot apply"
            )
        if not quantization_bit and quantize is None:
            return None
        return cls(model, layout, bits=quantization_bit, mode=quantize, dtype=dtype, device=device)

    def _required(self, linear: nn.Linear) -> set[str]:
        parts = {"weight", "weight_scale"} if self.bits else {"weight"}
        return parts | ({"bias"} if linear.bias is not None else set())

    def _check(self, name: str, part: str, tensor: torch.Tensor, linear: nn.Linear) -> None:
        out_f, in_f = linear.out_features, linear.in_features
        what = f"a THUDM pre-quantized int{self.bits} checkpoint" if self.bits else "this config"
        expected: tuple[int, ...] = (out_f,)
        if part == "weight":
            expected = (out_f, in_f * self.bits // 8) if self.bits else (out_f, in_f)
            if self.bits and tensor.dtype != torch.int8:
                raise CheckpointError(f"{name}: {what} stores int8 weights, got {tensor.dtype}")
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{name} has shape {tuple(tensor.shape)}, {what} implies {expected}"
            )

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Consume ``name`` if it belongs to a quantised linear; ``False`` leaves it to the caller.
        A duplicate, unexpected part or wrong shape is a :class:`CheckpointError`."""
        if not self.layout.covers(name):
            return False
        module_name, _, part = name.rpartition(".")
        if module_name in self._done:
            raise CheckpointError(f"tensor {name} appears after its linear was complete")
        pending = self._pending.get(module_name)
        if pending is None:
            linear = self.model.get_submodule(module_name)
            assert isinstance(linear, nn.Linear), module_name
            pending = self._pending[module_name] = _Pending(linear, {})
        if part not in self._required(pending.linear) or part in pending.parts:
            raise CheckpointError(f"unexpected or duplicate tensor {name}")
        self._check(name, part, tensor, pending.linear)
        pending.parts[part] = tensor
        if set(pending.parts) == self._required(pending.linear):
            self._build(module_name, self._pending.pop(module_name))
        return True

    def _build(self, module_name: str, pending: _Pending) -> None:
        parts = pending.parts
        bias = parts.get("bias")
        if bias is not None:
            bias = bias.to(device=self.device, dtype=self.dtype)
        layer: nn.Module
        if self.bits:
            layer = from_thudm(
                parts["weight"],
                parts["weight_scale"],
                self.bits,
                bias,
                device=self.device,
                kernel=self.kernel,
            )
        else:
            assert self.mode is not None
            layer = quantize_weight(
                parts["weight"], self.mode, bias, device=self.device, kernel=self.kernel,
                arithmetic=self.layout.arithmetic,
            )
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, layer)
        self._done.add(module_name)
        self._replaced |= {f"{module_name}.{p}" for p in ("weight", "bias") if p in parts}

    def finish(self) -> set[str]:
        """Names of the placeholder parameters now replaced (for the caller's missing check);
        raises :class:`CheckpointError` if a linear is incomplete."""
        if self._pending:
            raise CheckpointError(f"incomplete quantised linears: {sorted(self._pending)}")
        return set(self._replaced)


def loading_progress(
    folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], desc: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass ``tensors`` through with a tqdm bar over the checkpoint's bytes (hidden off a TTY)."""
    with tqdm(total=total_size(folder), desc=desc, unit="B", unit_scale=True, disable=None) as bar:
        for name, tensor in tensors:
            yield name, tensor
            bar.update(tensor.nbytes)
