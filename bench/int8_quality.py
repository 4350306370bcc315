"""What ``--int8-activations`` does to the logits: top-1 agreement and the largest change of a
top-5 logprob against the exact path, on THUDM's tiny reference checkpoints and on the
ChatGLM2-6B-shaped random model.

    python -m bench.int8_quality [--layers N] [--positions 256] [--no-random] [--no-reference]

Each model is loaded in bf16 (the dtype the native kernels run) and fed the same ids twice,
exactly and with int8 activations on every call (``min_rows=1``: every position is quantised,
as in a prefill chunk), logits of every position kept.  Reference checkpoints (``../shared/
reference``, skipped when absent): each oracle case's prompt followed by the reference's greedy
answer; the pre-quantised int8 / int4 folders as they are, the fp16 ones quantised on load.  The
random model: ``--positions`` random ids.  Per model: the positions compared, the fraction whose
argmax agrees, and over every position the largest and the mean |delta logprob| of the exact
path's top-5 tokens.  For scale, the same figures for a change users already accept: on the
reference checkpoints the exact bf16 path against float32 (these tiny random models are very
sensitive to any rounding), on the random model int4 weights against int8 weights.
Prints a Markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.registry import FAMILIES, detect_family
from adapters.weights.activations import disable_int8_activations, enable_int8_activations
from bench.common import (
    ModelShape,
    add_model_arguments,
    build_model,
    markdown_table,
    shape_from_args,
)

logger = logging.getLogger("bench.int8_quality")

#: THUDM's reference material beside the repository (as the tests find it; the same override)
REFERENCE = Path(os.environ.get("CHATGLM_REFERENCE_DIR",
                                Path(__file__).resolve().parent.parent.parent / "shared"
                                / "reference"))
#: (checkpoint, quantize on load): THUDM's pre-quantised folders as they are, fp16 ones quantised
REFERENCE_MODELS: tuple[tuple[str, str | None], ...] = (
    ("chatglm2-6b-int8-tiny", None),
    ("chatglm2-6b-tiny", "4"),
    ("chatglm3-6b-tiny-safetensors", "4"),
    ("chatglm3-6b-tiny-safetensors", "8"),
    ("chatglm-6b-int4-tiny", None),
    ("chatglm-6b-tiny", "8"),
)


@dataclass(frozen=True)
class Agreement:
    positions: int
    top1: float
    max_delta: float
    mean_delta: float

    def cells(self) -> list[str]:
        return [f"{self.top1:.1%}", f"{self.max_delta:.3f}", f"{self.mean_delta:.4f}"]


def compare(exact: torch.Tensor, approx: torch.Tensor) -> Agreement:
    """Logits ``[positions, vocab]`` of both paths -> agreement figures."""
    a, b = exact.float().log_softmax(-1), approx.float().log_softmax(-1)
    top5 = a.topk(5, dim=-1).indices
    delta = (a.gather(-1, top5) - b.gather(-1, top5)).abs()
    return Agreement(a.shape[0], (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                     delta.max().item(), delta.mean().item())


@torch.inference_mode()
def both_paths(model: torch.nn.Module, sequences: Sequence[Sequence[int]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position's logits of every sequence, exact then with int8 activations."""
    out = []
    for enable in (False, True):
        if enable:
            enable_int8_activations(model, min_rows=1)
        else:
            disable_int8_activations(model)
        out.append(torch.cat([model.forward(list(ids), model.new_cache(), every_position=True)
                              for ids in sequences]))
    disable_int8_activations(model)
    return out[0], out[1]


def oracle_sequences(name: str) -> list[list[int]]:
    """Each oracle case's prompt ids followed by the reference's greedy answer."""
    data = json.loads((REFERENCE / "oracle" / f"{name}.json").read_text(encoding="utf-8"))
    sequences = []
    for case in data["cases"]:
        inputs = case["inputs"]
        inputs = ast.literal_eval(inputs) if isinstance(inputs, str) else inputs
        new = case["greedy_new_ids"]
        new = ast.literal_eval(new) if isinstance(new, str) else new
        sequences.append(list(inputs["input_ids"][0]) + list(new))
    return sequences


def reference_rows() -> list[list[str]]:
    rows = []
    for name, quantize in REFERENCE_MODELS:
        folder = REFERENCE / "checkpoints" / name
        spec = FAMILIES[detect_family(folder)]
        config = spec.read_config(folder)
        sequences = oracle_sequences(name)
        bits = getattr(config, "quantization_bit", 0)
        weights = f"int{bits} (THUDM)" if bits else f"int{quantize} (on load)"
        models = {dtype: spec.load_model(folder, config, dtype=dtype, device=torch.device("cpu"),
                                         quantize=quantize)
                  for dtype in (torch.float32, torch.bfloat16)}
        if not enable_int8_activations(models[torch.bfloat16]):
            logger.warning("%s: no layer takes int8 activations here; skipped", name)
            continue
        exact, int8 = both_paths(models[torch.bfloat16], sequences)
        with torch.inference_mode():
            fp32 = torch.cat([models[torch.float32].forward(list(ids), models[torch.float32]
                                                            .new_cache(), every_position=True)
                              for ids in sequences])
        result, scale = compare(exact, int8), compare(fp32, exact)
        logger.info("%s %s: %s; bf16 vs fp32: %s", name, weights, result, scale)
        rows.append([name, weights, str(result.positions), *result.cells(), *scale.cells()])
    return rows


def random_rows(shape: ModelShape, positions: int) -> list[list[str]]:
    """Both weight formats of the same random weights; for scale, their exact paths against each
    other (what choosing int4 over int8 weights changes)."""
    ids = torch.randint(3, shape.config.padded_vocab_size, (positions,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    results: dict[str, tuple[torch.Tensor, Agreement]] = {}
    for mode in ("int8", "int4"):
        model = build_model(shape, mode)
        if not enable_int8_activations(model):
            logger.warning("no layer takes int8 activations here; the random model is skipped")
            return []
        exact, int8 = both_paths(model, [ids])
        results[mode] = exact, compare(exact, int8)
        logger.info("random %s %s: %s", shape.describe(), mode, results[mode][1])
        del model, int8
        gc.collect()
    scale = compare(results["int8"][0], results["int4"][0])
    return [[f"random {shape.preset}, {shape.config.num_layers} layers", mode,
             str(result.positions), *result.cells(), *scale.cells()]
            for mode, (_, result) in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--positions", type=int, default=256,
                        help="random ids fed to the random model")
    parser.add_argument("--no-random", dest="random", action="store_false")
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shape = shape_from_args(args)
    rows = []
    if args.reference:
        if (REFERENCE / "oracle").is_dir():
            rows += reference_rows()
        else:
            logger.warning("no reference material at %s: reference checkpoints skipped",
                           REFERENCE)
    if args.random:
        rows += random_rows(shape, args.positions)
    print("\nint8 activations vs the exact path (bf16 compute), every position's logits.  For "
          "scale, the same figures for a change users already accept: on the reference "
          "checkpoints the exact bf16 path vs float32, on the random model its int4 weights vs "
          "its int8 weights (exact paths):\n")
    print(markdown_table(["model", "weights", "positions", "top-1 agreement",
                          "max abs d logprob top-5", "mean abs d logprob top-5",
                          "scale: top-1", "max", "mean"], rows))


if __name__ == "__main__":
    main()
