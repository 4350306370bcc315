"""Sharing a kept KV cache without cutting it: ``copy_prefix`` of each family's cache (any dtype,
CPU and CUDA when present) and the prefix cache's choice between taking an entry (a later turn of
its conversation) and copying its shared positions (another conversation, another branch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.chatglm.model import load_model as load_v1
from adapters.chatglm2.config import read_config
from adapters.chatglm2.model import load_model as load_v2
from adapters.runtime.engine import Engine
from adapters.runtime.kv_cache import INITIAL_CAPACITY
from tests.test_chatglm2_model import BASE_CONFIG, random_state_dict
from tests.test_chatglm2_model import write_checkpoint as write_v2
from tests.test_chatglm_model import prompt as v1_prompt
from tests.test_chatglm_model import write_checkpoint as write_v1
from tests.test_engine import run, spec
from tests.toys import ByteTokenizer, HashLM

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(scope="module")
def v2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_v2(tmp_path_factory.mktemp("v2"), BASE_CONFIG, random_state_dict(BASE_CONFIG),
                    "bin")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_copied_prefix_continues_like_a_fresh_prefill_and_leaves_the_source(
        v2_folder: Path, dtype: torch.dtype, device: str) -> None:
    model = load_v2(v2_folder, read_config(v2_folder), dtype=dtype, device=torch.device(device))
    ids = torch.randint(3, 90, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    source = model.new_cache()
    model.forward(ids[:70], source)  # past the first allocation: the source has grown once
    before = source.storage[:, :, :, :70].clone()

    copy = source.copy_prefix(40, room=60)
    assert (copy.length, source.length) == (40, 70)
    assert copy.storage.dtype == dtype and copy.storage.device.type == device
    assert torch.equal(copy.storage[:, :, :, :40], before[:, :, :, :40])
    # room for the rest of the prompt was allocated with the copy: no growth while it is fed
    storage = copy.storage
    logits = model.forward(ids[40:], copy)
    assert copy.storage is storage and copy.length == 100
    fresh = model.forward(ids, model.new_cache())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(logits, fresh, atol=tol, rtol=tol)
    # writing after the copied positions never touched the source
    assert torch.equal(source.storage[:, :, :, :70], before)
    assert copy.nbytes == copy.storage.numel() * copy.storage.element_size()


def test_a_copy_is_sized_like_a_grown_cache(v2_folder: Path) -> None:
    model = load_v2(v2_folder, read_config(v2_folder), dtype=torch.float32,
                    device=torch.device("cpu"))
    source = model.new_cache()
    model.forward(list(range(3, 83)), source)
    assert source.copy_prefix(12).capacity == INITIAL_CAPACITY
    assert source.copy_prefix(70).capacity == 2 * INITIAL_CAPACITY
    assert source.copy_prefix(12, room=10**6).capacity == model.context_length  # capped


def test_chatglm6b_copies_keep_its_context_and_refuse_to_cut_inside_it(
        tmp_path: Path) -> None:
    """ChatGLM-6B's cache carries where its bidirectional context ends and the mask position
    (its 2-D positions): a copy keeps them, and cannot end inside the context."""
    from adapters.chatglm.config import read_config as read_v1

    folder = write_v1(tmp_path / "v1")
    model = load_v1(folder, read_v1(folder), dtype=torch.float32, device="cpu")
    ids, generated = v1_prompt(20), [17, 42, 99, 120, 7]
    cache = model.new_cache()
    model.forward(ids, cache)
    for token in generated[:4]:
        model.forward([token], cache)
    copy = cache.copy_prefix(len(ids) + 2)
    assert (copy.context_length, copy.mask_position) == (cache.context_length,
                                                         cache.mask_position)
    for token in generated[2:]:
        logits = model.forward([token], copy)
    full = model.forward(ids + generated, model.new_cache())
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="context"):
        cache.copy_prefix(5)
    assert cache.length == len(ids) + 4


ANSWER = 12


def _hash_engine(**kw: object) -> Engine:
    return Engine(HashLM(), ByteTokenizer(), spec(), name="hash", **kw)  # type: ignore[arg-type]


def _answer(engine: Engine, prompt: bytes, **params: object) -> tuple[str, int]:
    """The answer (``ANSWER`` ids: HashLM never ends) and its cached prompt tokens."""
    c = run(engine, prompt=prompt, max_tokens=ANSWER, **params)
    final = c.final
    assert final.finish_reason == "length" and final.usage is not None
    return c.text, final.usage.prompt_tokens_details.cached_tokens


def test_a_regenerated_answer_leaves_the_first_branch_in_the_cache() -> None:
    """A client regenerates the last answer (same history, another answer: here pushed to
    ``z`` by a logit bias), then continues the first answer after all: both branches'
    histories come from the cache, and every answer is the one computed without reuse."""
    history = b"system: answer briefly.\nQ: tell me about the sea?\n"

    def branches(engine: Engine) -> list[tuple[str, int]]:
        first = _answer(engine, history)
        second = _answer(engine, history, logit_bias=((ord("z"), 20.0),))
        return [first, second,
                _answer(engine, history + first[0].encode() + b"\nQ: more?\n"),
                _answer(engine, history + second[0].encode() + b"\nQ: more?\n")]

    cold, warm = _hash_engine(prefix_cache=False), _hash_engine(prefix_cache=True)
    try:
        got = branches(warm)
        assert [text for text, _ in got] == [text for text, _ in branches(cold)]
        first, second = got[0][0], got[1][0]
        assert first != second == "z" * ANSWER
        # the regenerate shares the whole history (one id is always fed for fresh logits);
        # each continuation shares its branch: history + answer but its last id (never fed)
        assert [cached for _, cached in got] == [
            0, len(history) - 1, len(history) + len(first) - 1, len(history) + len(second) - 1]
        assert warm.prefix.copies == 1
    finally:
        cold.close()
        warm.close()


def test_a_repeated_request_replaces_the_entry_it_repeats() -> None:
    """The same request twice (a retry) leaves one entry, not two copies of one history."""
    engine = _hash_engine(prefix_cache=True)
    try:
        for _ in range(2):
            _answer(engine, b"a question asked twice, word for word")
        assert len(engine.prefix) == 1
        assert engine.prefix.copies == 1
    finally:
        engine.close()


def test_only_a_later_turn_of_its_conversation_takes_an_entry() -> None:
    """Per request: whether the entry is taken (cut to the shared ids) or its shared ids copied
    (the entry stays whole).  The entry: a 20-id prompt and a 20-id answer."""
    from adapters.runtime.prefix_cache import JOIN_SLACK, PrefixCache
    from tests.toys import ToyCache

    held = list(range(100, 140))
    other = list(range(500, 600))
    cases = [  # request, ids reused, entry taken
        (held[:12] + other, 12, False),  # another chat: the template's first ids only
        (held[:20], 19, False),  # the answer regenerated (one id is always left to feed)
        (held + other, 40, True),  # the next turn
        (held[:25] + other, 25, True),  # the next turn, its answer encoded differently
        (held[:20 - JOIN_SLACK] + other, 20 - JOIN_SLACK, True),  # ... and the join too
        (held[:19 - JOIN_SLACK] + other, 19 - JOIN_SLACK, False),  # the last question edited
    ]
    for ids, reused, taken in cases:
        store = PrefixCache(10**6)
        store.put(held, ToyCache(list(held)), prompt_len=20)
        found = store.take(ids)
        assert found is not None and found[1] == reused
        assert found[0].ids == held[:reused]  # type: ignore[attr-defined]
        assert (len(store) == 0) == taken, ids
        if not taken:
            [entry] = store._entries.values()
            assert entry.cache.ids == held  # type: ignore[attr-defined]
