"""A greedy request gets the same answer alone or among others, on bf16 weights, through HTTP.

bf16 checkpoints (what ``--dtype auto`` picks for an unquantised model on a CPU) used to run their
linears on oneDNN, whose summation order depends on how many rows it multiplies, and prompt
attention on SDPA, whose blocking depends on the chunk: a request's logits moved with its batch,
and greedy answers changed.  On the native kernels every row's arithmetic is fixed, so 8 clients
streaming at once, with their prompts prefilled in the same steps and split into chunks wherever
the others left room, each get exactly the answer they get alone.

The checkpoints are written here (random weights, real tokenizers, THUDM's layout) with a hidden
size of 512: wide enough that oneDNN's GEMM does change a row's bits with the batch.  Served by a
real uvicorn server on 127.0.0.1, asked with the official async ``openai`` client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import save_file

from adapters.chat_model import TorchChatModel
from adapters.chatglm import config as v1_config
from adapters.chatglm.model import ChatGLMModel
from adapters.chatglm2 import config as v2_config
from adapters.chatglm2.model import ChatGLM2Model
from adapters.registry import load_chat_model
from adapters.weights import native
from gateway.app import create_app
from gateway.settings import ServerSettings
from tests.conftest import checkpoint_dir, requires_reference
from tests.server import running_server

pytestmark = [
    requires_reference,
    pytest.mark.skipif(native.library() is None, reason="the native CPU kernels are unavailable "
                       "here (batch invariance in bf16 is theirs)"),
]

QUESTIONS = ["你好", "What is 2 + 2?", "写一首诗", "Tell me a joke about cats and dogs.",
             "晚上睡不着应该怎么办", "List three colours.", "介绍一下北京的历史和文化", "How do rainbows form?"]
#: (reference checkpoint to take config.json keys and tokenizer files from, sizes, model class)
SHAPES: dict[str, tuple[str, dict[str, int], Callable[[Path], torch.nn.Module]]] = {
    "chatglm2": ("chatglm2-6b-tiny", {"hidden_size": 512, "num_attention_heads": 8,
                                       "kv_channels": 64, "ffn_hidden_size": 1024},
                 lambda folder: ChatGLM2Model(v2_config.read_config(folder))),
    "chatglm": ("chatglm-6b-tiny", {"hidden_size": 512, "num_attention_heads": 8,
                                     "inner_hidden_size": 1024},
                lambda folder: ChatGLMModel(v1_config.read_config(folder))),
}


def write_bf16_checkpoint(folder: Path, family: str) -> Path:
    """A random checkpoint of ``family`` in THUDM's layout (config.json, one safetensors file,
    the reference tokenizer files), stored in bf16."""
    reference, sizes, build = SHAPES[family]
    source = checkpoint_dir(reference)
    folder.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text()) | sizes | {"torch_dtype": "bfloat16"}
    for path in source.iterdir():
        if path.suffix in (".model", ".json") and path.name not in ("config.json",) \
                and not path.name.endswith("index.json"):
            shutil.copyfile(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in build(folder).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("final_layernorm.weight"):
            # signs at random: ChatGLM-6B's tied output layer would otherwise make a random
            # model repeat its input (alpha = 7.5 keeps the last embedding dominant)
            tensors[name] = torch.randn(shape, generator=gen).to(torch.bfloat16)
        elif "layernorm" in name:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.05, generator=gen)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=sorted(SHAPES))
def served(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(base URL, family) of a server with two models of one bf16 checkpoint: ``plain``
    (the default 512-token prefill chunk) and ``chunked`` (7-token chunks, no prefix reuse: every
    prompt is cut into pieces whose boundaries depend on the prompts queued before it)."""
    family = request.param
    folder = write_bf16_checkpoint(tmp_path_factory.mktemp(family) / "ckpt", family)
    plain = load_chat_model("plain", folder, dtype="bfloat16", device="cpu", max_running=8)
    # the same loaded weights behind a second engine (the two are never asked at once)
    chunked = TorchChatModel(dataclasses.replace(plain.info, id="chunked"), plain.spec,
                             plain.tokenizer, plain.model, max_running=8, prefill_chunk=7,
                             prefix_cache=False)
    models = {"plain": plain, "chunked": chunked}
    try:
        with running_server(create_app(ServerSettings(), models=models), timeout=60) as url:
            yield url, family
    finally:
        for model in models.values():
            model.close()


async def _answer(client: openai.AsyncOpenAI, model: str, question: str) -> str:
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], stream=True,
        temperature=0, max_tokens=12,
    )
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def test_eight_greedy_streams_at_once_get_their_solo_answers(served: tuple[str, str]) -> None:
    url, family = served

    async def run() -> tuple[list[str], list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x") as client:
            alone = [await _answer(client, "plain", q) for q in QUESTIONS]
            together = await asyncio.gather(*(_answer(client, "plain", q) for q in QUESTIONS))
            chunked = await asyncio.gather(*(_answer(client, "chunked", q) for q in QUESTIONS))
            return alone, list(together), list(chunked)

    alone, together, chunked = asyncio.run(run())
    assert all(alone), "every request must produce text"
    assert len(set(alone)) > 1, "different questions should not all get the same answer"
    assert together == alone, family
    # prompts prefilled in the same steps, in 7-token chunks cut wherever the others left room
    assert chunked == alone, family
