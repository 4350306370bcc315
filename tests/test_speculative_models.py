"""Speculative decoding on the real families: a verification forward (several ids per sequence,
logits at every position) computes what one-id decode steps compute, and on THUDM's tiny
reference checkpoints greedy ids with drafts verified are the ids of plain decoding and the
reference's own greedy ids; seeded sampling gives the same ids with and without speculation."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from adapters.base import Delta, Prompt, SamplingParams
from adapters.chatglm.config import read_config
from adapters.chatglm.model import load_model
from adapters.demo import ensure_demo_checkpoint
from adapters.registry import load_chat_model
from adapters.runtime.engine import Engine
from adapters.runtime.speculative import SpeculativeConfig
from adapters.weights import native
from tests.conftest import checkpoint_dir, oracle, requires_reference
from tests.test_chatglm_model import prompt, write_checkpoint
from tests.test_fast_paths import _TINY, _tiny_model

# prompt_lookup_min 1: the random tiny models rarely repeat a 2-gram in 64 ids; single ids do
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
               "prompt_lookup_min": 1}


def _generate(engine: Engine, ids: tuple[int, ...], params: SamplingParams) -> list[int]:
    done = threading.Event()

    def deliver(delta: Delta) -> None:
        if delta.finish_reason is not None:
            done.set()

    seq = engine.submit(Prompt(ids, params), deliver)
    assert done.wait(60), "generation did not finish"
    return list(seq.generated)


def _verify_rows_equal_steps(model, prompts: list[list[int]], fed: list[list[int]],
                             exact: bool) -> None:
    """``forward_batch(fed, every_position=True)`` after ``prompts`` gives, row by row, what
    feeding the same ids one decode step at a time gives; the caches end at the same length."""
    together = [model.new_cache() for _ in prompts]
    stepwise = [model.new_cache() for _ in prompts]
    for p, a, b in zip(prompts, together, stepwise, strict=True):
        model.forward(p, a)
        model.forward(p, b)
    rows = model.forward_batch(fed, together, every_position=True)
    assert rows.shape == (sum(len(f) for f in fed), model.padded_vocab_size)
    r = 0
    for ids, cache in zip(fed, stepwise, strict=True):
        for token in ids:
            expected = model.forward([token], cache)
            if exact:
                assert torch.equal(rows[r], expected), r
            else:
                tol = 1e-4 * expected.abs().max().item()
                assert torch.allclose(rows[r], expected, atol=tol, rtol=0), r
            r += 1
    assert [c.length for c in together] == [c.length for c in stepwise]
    # a rejected draft is cut off: the next step continues as if it had never been fed
    together[0].truncate(together[0].length - len(fed[0]) + 1)
    stepwise[0].truncate(stepwise[0].length - len(fed[0]) + 1)
    again = model.forward_batch([[7], [8]], together[:2])
    for i in range(2):
        expected = model.forward([[7], [8]][i], stepwise[i])
        assert torch.allclose(again[i], expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("multi_query", [True, False])
def test_chatglm2_verification_rows_equal_decode_steps(dtype: torch.dtype,
                                                        multi_query: bool) -> None:
    cfg = dataclasses.replace(_TINY, multi_query_attention=multi_query)
    model = _tiny_model(dtype, cfg)
    # bf16 MQA on the CPU runs the native kernels: a verification row is then bit for bit the
    # decode step's (rows of the same kernels; the attention of each row alone)
    exact = dtype == torch.bfloat16 and multi_query and native.library() is not None
    _verify_rows_equal_steps(model, [[5, 6, 7], list(range(10, 75)), [9]],
                             [[40, 41, 42, 43, 44], [50], [60, 61]], exact)


def test_chatglm_verification_rows_equal_decode_steps(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path)
    model = load_model(folder, read_config(folder), dtype=torch.float32, device="cpu")
    _verify_rows_equal_steps(model, [prompt(6), prompt(11, seed=1), prompt(3, seed=2)],
                             [[17, 33, 60, 5], [9], [70, 71]], exact=False)


@requires_reference
@pytest.mark.parametrize(("name", "dtype"), [
    ("chatglm-6b-tiny", "float32"),
    ("chatglm2-6b-tiny", "float32"),
    ("chatglm3-6b-tiny-safetensors", "float32"),
    ("chatglm2-6b-tiny", "bfloat16"),  # the native kernels where the CPU has them
])
def test_speculative_ids_equal_plain_and_reference_greedy(name: str, dtype: str) -> None:
    cases = oracle(name)["cases"][:2]
    loaded = load_chat_model("plain", checkpoint_dir(name), dtype=dtype, device="cpu",
                             prefix_cache=False)
    plain = loaded.engine
    # a second engine over the same weights, drafting
    fast = Engine(loaded.model, loaded.tokenizer, loaded.spec, name="fast", prefix_cache=False,
                  speculative=SpeculativeConfig(**SPECULATIVE))
    try:
        for case in cases:
            ids = tuple(case["inputs"]["input_ids"][0])
            greedy = SamplingParams(temperature=0.0, max_tokens=40)
            expected = _generate(plain, ids, greedy)
            assert _generate(fast, ids, greedy) == expected, case["case"]
            if dtype == "float32":  # the reference computed in fp32
                reference = case["greedy_new_ids"]
                n = min(len(reference), len(expected))
                assert expected[:n] == reference[:n], case["case"]
            # a penalty below 1 favours ids already seen: the random tiny models then repeat
            # themselves and the prompt, so drafts get accepted on every family
            for params in (SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=0.2),
                           SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=24,
                                          repetition_penalty=0.5)):
                assert _generate(fast, ids, params) == _generate(plain, ids, params), case["case"]
        assert fast.accepted_tokens > 0
        assert fast.drafted_tokens > fast.accepted_tokens
    finally:
        fast.close()
        loaded.close()


def test_grammar_holds_and_output_is_unchanged_with_drafts(tmp_path: Path) -> None:
    """Constrained decoding with speculation (demo checkpoint, a JSON schema): drafts copied from
    a prompt that shows the JSON are checked against the grammar position by position (a draft
    id the grammar forbids is never picked, so it is rejected), and the answers are plain
    decoding's, valid, alone and batched."""
    from tests.test_grammar_engine import load, request, run_all, valid

    folder = ensure_demo_checkpoint(tmp_path)
    plain, fast = load(folder), load(folder, speculative=SPECULATIVE)
    try:
        questions = ['Answer like {"name":"abc","n":5,"ok":true} please',
                     '{"name":"xy","n":12,"ok":false} or {"name":"xy","n":1,"ok":true}?']
        for params in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 4}):
            reqs = [request(q, **params) for q in questions]  # type: ignore[arg-type]
            expected = [(t, d.finish_reason, d.usage) for t, d in run_all(plain, reqs)]
            got = [(t, d.finish_reason, d.usage) for t, d in run_all(fast, reqs)]
            assert got == expected
            assert all(reason == "stop" and valid(text) for text, reason, _ in got)
        status = fast.status()
        assert status["speculative_accepted"] > 0
    finally:
        plain.close()
        fast.close()


def test_grammar_cuts_a_draft_where_it_forbids_an_id(tmp_path: Path) -> None:
    from adapters.runtime.grammar import TokenGrammar
    from tests.test_grammar_engine import JSON

    model = load_chat_model("demo", ensure_demo_checkpoint(tmp_path), dtype="float32",
                            device="cpu")
    try:
        grammar = model.grammar
        assert isinstance(grammar, TokenGrammar)
        walker = grammar.matcher(grammar.compile(JSON))
        good = []
        for _ in range(6):  # a valid start: the first id the grammar allows, six times
            token = int(walker.allowed().nonzero()[0])
            walker.accept(token)
            good.append(token)
        bad = int((~walker.allowed()).nonzero()[0])
        matcher = grammar.matcher(grammar.compile(JSON))
        assert matcher.valid_prefix(good + [bad] + good) == len(good)
        assert matcher.valid_prefix(good) == len(good)
        matcher.accept(good[0])  # valid_prefix did not move it: the first id is still next
        assert matcher.valid_prefix(good[1:]) == len(good) - 1
    finally:
        model.close()
