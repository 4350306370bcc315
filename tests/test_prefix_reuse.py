"""Prefix reuse on the real ChatGLM2 model: a conversation resent turn by turn gives the same
greedy answers with reuse as without, while the shared history is not computed again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.base import ChatRequest, Message, SamplingParams
from adapters.chat_model import TorchChatModel
from adapters.demo import ensure_demo_checkpoint
from adapters.registry import load_chat_model


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("demo"))


async def _answer(model: TorchChatModel, messages: list[Message]) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompt = model.prepare(ChatRequest(tuple(messages), params))
    return "".join([d.text async for d in model.generate(prompt)])


def _conversation(model: TorchChatModel) -> list[str]:
    async def run() -> list[str]:
        messages: list[Message] = []
        answers = []
        for turn in range(5):
            messages.append(Message("user", f"第{turn}轮：请继续讲一讲这个话题 number {turn}."))
            answer = await _answer(model, messages)
            answers.append(answer)
            messages.append(Message("assistant", answer))
        return answers

    return asyncio.run(run())


def test_reuse_keeps_answers_and_saves_prefill(demo_dir: Path) -> None:
    cold = load_chat_model("cold", demo_dir, dtype="float32", device="cpu", prefix_cache=False)
    warm = load_chat_model("warm", demo_dir, dtype="float32", device="cpu", prefix_cache=True)
    try:
        assert _conversation(warm) == _conversation(cold)
        assert warm.engine.prefix.hits >= 3
        assert warm.engine.prefix.reused_tokens > 100
        assert cold.engine.prefix.hits == 0
    finally:
        cold.close()
        warm.close()


def test_chunked_prefill_matches_whole_prompt(demo_dir: Path) -> None:
    whole = load_chat_model("whole", demo_dir, dtype="float32", device="cpu",
                            prefix_cache=False, prefill_chunk=0)
    chunked = load_chat_model("chunked", demo_dir, dtype="float32", device="cpu",
                              prefix_cache=False, prefill_chunk=5)
    try:
        messages = [Message("user", "A prompt long enough to be fed in several chunks, 你好！" * 3)]
        assert asyncio.run(_answer(chunked, messages)) == asyncio.run(_answer(whole, messages))
    finally:
        whole.close()
        chunked.close()
