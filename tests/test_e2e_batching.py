"""Eight clients at once on the fast path: THUDM's int8 folder and an int4 quantise-on-load model,
served in bfloat16 (the native CPU kernels where they build, torch's kernels elsewhere) by a real
uvicorn server, streamed with the official async ``openai`` client.  Every client must get, while
the others stream beside it, exactly the answer its request gets alone (greedy): batching changes
no one's tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.conftest import checkpoint_dir, requires_reference
from tests.server import running_server

pytestmark = requires_reference

MODELS = {
    "int8-folder": ("chatglm2-6b-int8-tiny", None),
    "int4-on-load": ("chatglm2-6b-tiny", "4"),
}
QUESTIONS = ["你好", "What is 2 + 2?", "写一首诗", "Tell me a joke.", "晚上睡不着应该怎么办",
             "List three colours.", "介绍一下北京", "How do rainbows form?"]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    settings = ServerSettings(models=tuple(
        ModelEntry(id=model_id, path=checkpoint_dir(folder), dtype="bfloat16", device="cpu",
                   quantize=quantize, max_running=8)
        for model_id, (folder, quantize) in MODELS.items()
    ))
    with running_server(create_app(settings), timeout=120, wait_ready=True) as url:
        yield url


async def _stream(client: openai.AsyncOpenAI, model: str, question: str) -> str:
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], stream=True,
        temperature=0, max_tokens=24,
    )
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_eight_streams_at_once_get_their_solo_answers(base_url: str, model: str) -> None:
    async def run() -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x") as client:
            alone = [await _stream(client, model, q) for q in QUESTIONS]
            together = await asyncio.gather(*(_stream(client, model, q) for q in QUESTIONS))
            return alone, list(together)

    alone, together = asyncio.run(run())
    assert all(alone), "every request must produce text"
    assert len(set(alone)) > 1, "different questions should not all get the same answer"
    assert together == alone
