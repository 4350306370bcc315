"""Cost of grammar-constrained decoding per step: the llguidance mask and its application to a row.

    python -m bench.grammar [--steps 400] [--batches 1,8] [--tokenizer PATH/tokenizer.model]
                            [--threads N] [--llguidance-threads N]

Sequences follow a JSON-schema grammar (an object with a free string, an integer, an enum, an array
of strings and a nested object) with random logits on ChatGLM2-6B's padded vocabulary (65024),
picking the argmax of the masked row; a sequence that ends starts over.  Per step it times, for 1
and 8 sequences:

* ``fill``: llguidance computing the bit masks (:meth:`TokenGrammar.fill_bitmask`; 8 sequences:
  one parallel call);
* ``apply``: clearing non-text ids and setting the forbidden ids of the rows to -inf
  (:meth:`TokenGrammar.apply_bitmask`);
* ``mask``: both, as the engine calls them: :meth:`GrammarMatcher.mask` for one row,
  :meth:`TokenGrammar.mask_batch` for 8;
* ``one by one``: 8 rows masked with 8 ``GrammarMatcher.mask`` calls, for comparison.

The vocabulary is THUDM's ChatGLM2 ``tokenizer.model`` (``--tokenizer``, or
``../shared/reference/tokenizers/chatglm2-6b/tokenizer.model`` next to the repository, or
``$CHATGLM_REFERENCE_DIR/tokenizers/...``); without it the demo checkpoint's small self-trained
tokenizer is used (the mask then walks far fewer ids, so it is cheaper), padded to 65024 all the same.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adapters.base import GrammarSpec
from adapters.chatglm2.tokenizer import ChatGLM2Tokenizer
from adapters.family import Tokenizer
from adapters.runtime.grammar import GrammarMatcher, TokenGrammar
from bench.common import machine_summary, markdown_table
from bench.workload import EOS_ID, load_tokenizer

logger = logging.getLogger("bench.grammar")

PADDED_VOCAB = 65024  # ChatGLM2-6B's logits row

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"enum": ["北京", "上海", "San Francisco"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 30},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "city", "tags", "address"],
    "additionalProperties": False,
}


def default_tokenizer_file() -> Path:
    root = Path(__file__).resolve().parent.parent
    reference = Path(os.environ.get("CHATGLM_REFERENCE_DIR", root.parent / "shared" / "reference"))
    return reference / "tokenizers" / "chatglm2-6b" / "tokenizer.model"


def pick_tokenizer(path: Path | None, cache_dir: Path) -> tuple[Tokenizer, str]:
    path = path or default_tokenizer_file()
    if path.is_file():
        return ChatGLM2Tokenizer(path, "chatglm2"), f"ChatGLM2 tokenizer.model ({path.name})"
    logger.warning("no ChatGLM2 tokenizer.model at %s: using the demo checkpoint's small "
                   "tokenizer instead (cheaper masks than the real 64794-id vocabulary; pass "
                   "--tokenizer PATH for real figures)", path)
    return load_tokenizer(cache_dir), "demo tokenizer (small vocabulary, padded to 65024)"


def run(grammar: TokenGrammar, spec: GrammarSpec, batch: int, steps: int,
        how: str) -> list[float]:
    """Per-step timings (seconds) of ``steps`` steps with ``batch`` sequences.

    ``how``: "mask" (``GrammarMatcher.mask`` / ``TokenGrammar.mask_batch``), "one by one" (a
    ``mask`` call per row), "fill" or "apply" (the two halves of ``mask_batch`` alone).  The
    same seed gives every variant the same sequences."""
    gen = torch.Generator().manual_seed(batch)
    compiled = grammar.compile(spec)
    matchers: list[GrammarMatcher] = [grammar.matcher(compiled) for _ in range(batch)]
    times: list[float] = []
    stop_boost = torch.zeros(PADDED_VOCAB)
    stop_boost[EOS_ID] = 6.0  # a model that wants to stop once the grammar allows it
    for _ in range(steps):
        logits = torch.randn((batch, PADDED_VOCAB), generator=gen) + stop_boost
        if how in ("fill", "apply"):
            start = time.perf_counter()
            bitmask = grammar.fill_bitmask(matchers)
            fill_end = time.perf_counter()
            grammar.apply_bitmask(bitmask, [m.guard_state for m in matchers], logits)
            end = time.perf_counter()
            times.append(fill_end - start if how == "fill" else end - fill_end)
        else:
            start = time.perf_counter()
            if batch == 1:
                matchers[0].mask(logits[0])
            elif how == "one by one":
                for m, row in zip(matchers, logits, strict=True):
                    m.mask(row)
            else:
                grammar.mask_batch(matchers, logits)
            times.append(time.perf_counter() - start)
        for k, m in enumerate(matchers):
            m.accept(int(logits[k].argmax()))
            if m.done:
                m.reset()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a ChatGLM2 tokenizer.model (default: the shared reference copy)")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "chatglm-gateway-bench")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, one per core)")
    parser.add_argument("--llguidance-threads", type=int, default=None,
                        help="llguidance threads for batched masks (default: its choice, 80%% "
                             "of the cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, described = pick_tokenizer(args.tokenizer, args.cache_dir)

    start = time.perf_counter()
    grammar = TokenGrammar(tokenizer, {EOS_ID}, threads=args.llguidance_threads)
    built = time.perf_counter() - start
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    start = time.perf_counter()
    grammar.compile(spec)
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    grammar.matcher(spec)
    cached = time.perf_counter() - start
    logger.info("%s: %d text ids; TokenGrammar built in %.2f s; schema compiled in %.1f ms, "
                "a matcher from the cache in %.3f ms", described, grammar.text_ids, built,
                compiled * 1e3, cached * 1e3)

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for how in ("fill", "apply", "mask") + (("one by one",) if batch > 1 else ()):
            values = sorted(run(grammar, spec, batch, args.steps, how))
            p95 = values[int(0.95 * (len(values) - 1))]
            rows.append([str(batch), how, f"{statistics.mean(values) * 1e3:.3f}",
                         f"{statistics.median(values) * 1e3:.3f}", f"{p95 * 1e3:.3f}",
                         f"{values[-1] * 1e3:.3f}"])
    print(f"\n{described}; padded vocab {PADDED_VOCAB}; {machine_summary()}; "
          f"{args.steps} steps per row\n")
    print(markdown_table(["sequences", "per step", "mean ms", "median ms", "p95 ms", "max ms"],
                         rows))


if __name__ == "__main__":
    main()
