"""The engine streams ChatGLM-6B answers through the official post-processing (full-width
punctuation next to CJK, ``[[训练时间]]``) so that the deltas concatenate to exactly the answer the
official ``chat()`` returns, for every way the text splits into tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from adapters.base import Delta, Prompt, SamplingParams
from adapters.chatglm import SPEC, load_tokenizer, process_response
from adapters.runtime.engine import Engine
from tests.conftest import checkpoint_dir
from tests.toys import ToyCache

TEXTS = [
    "你好,世界!Hello, world: 真的吗?好的;",
    "  前后有空格 , ok ?  ",
    "训练时间是[[训练时间]],对吗?",
    "a,b!c:d;e?中,",
]


class IdsLM:
    """Greedy decoding follows ``ids`` then <eop>."""

    padded_vocab_size = 130528
    context_length = 2048
    kv_bytes_per_token = 1
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, ids: list[int], eop: int):
        self.ids, self.eop = ids, eop

    def new_cache(self) -> ToyCache:
        return ToyCache([])

    def forward(self, ids, cache: ToyCache) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if cache.prompt_len < 0:
            cache.prompt_len = len(ids)
        cache.ids.extend(ids)
        n = cache.length - cache.prompt_len
        row = torch.zeros(self.padded_vocab_size)
        row[self.ids[n] if n < len(self.ids) else self.eop] = 10.0
        return row

    def forward_batch(self, ids_per_seq, caches):  # type: ignore[no-untyped-def]
        return torch.stack([self.forward(i, c) for i, c in zip(ids_per_seq, caches, strict=True)])


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_v1_answer_equals_official_chat(text: str) -> None:
    tok = load_tokenizer(checkpoint_dir("chatglm-6b-tiny"))
    ids = tok.encode(text)
    engine = Engine(IdsLM(ids, 130005), tok, SPEC, name="v1")
    deltas: list[Delta] = []
    done = threading.Event()

    def deliver(d: Delta) -> None:
        deltas.append(d)
        if d.finish_reason:
            done.set()

    try:
        engine.submit(Prompt((5, 130001, 130004), SamplingParams(temperature=0.0, max_tokens=100)),
                      deliver)
        assert done.wait(10)
    finally:
        engine.close()
    assert deltas[-1].finish_reason == "stop"
    streamed = "".join(d.text for d in deltas)
    assert streamed == process_response(tok.decode(ids))
    assert len([d for d in deltas if d.text]) > 1  # it really streamed in pieces
