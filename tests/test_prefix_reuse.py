"""Prefix reuse on the real ChatGLM2 model: a conversation resent turn by turn gives the same
greedy answers with reuse as without, while the shared history is not computed again; several
conversations interleaved on one engine each keep their own history."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.base import ChatRequest, Message, SamplingParams, Usage
from adapters.chat_model import TorchChatModel
from adapters.demo import ensure_demo_checkpoint
from adapters.registry import load_chat_model
from adapters.runtime.prefix_cache import MIN_REUSE


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


async def _turn(model: TorchChatModel, messages: list[Message]) -> tuple[str, Usage, str]:
    prompt = model.prepare(ChatRequest(tuple(messages), SamplingParams(temperature=0.0,
                                                                      max_tokens=16)))
    text, usage, reason = [], None, None
    async for d in model.generate(prompt):
        text.append(d.text)
        usage, reason = d.usage or usage, d.finish_reason or reason
    assert usage is not None and reason in ("stop", "length"), reason
    return "".join(text), usage, reason


def _interleaved(model: TorchChatModel, chats: int, turns: int) -> list[list[tuple[str, Usage]]]:
    """``chats`` conversations on one engine, one turn of each in turn (what an affinity router
    sends a replica): per chat, each turn's answer and usage."""
    async def run() -> list[list[tuple[str, Usage]]]:
        histories: list[list[Message]] = [[] for _ in range(chats)]
        results: list[list[tuple[str, Usage]]] = [[] for _ in range(chats)]
        for turn in range(turns):
            for c, messages in enumerate(histories):
                messages.append(Message("user", f"对话{c}，第{turn}轮：tell me more about {c * 7 + turn}."))
                answer, usage, _ = await _turn(model, messages)
                messages.append(Message("assistant", answer))
                results[c].append((answer, usage))
                used = model.engine.cache_counts()
                assert used["kv_cache_used_bytes"] <= used["kv_cache_bytes"]
        return results

    return asyncio.run(run())


def test_interleaved_chats_each_reuse_their_own_history(demo_dir: Path) -> None:
    """Two chats alternating on one engine: every turn takes that chat's whole previous prompt
    from the cache (a new chat copies the template's first ids and leaves the other chat's
    history in place), and the answers are those computed without any reuse."""
    cold = load_chat_model("cold", demo_dir, dtype="float32", device="cpu", prefix_cache=False)
    warm = load_chat_model("warm", demo_dir, dtype="float32", device="cpu", prefix_cache=True)
    try:
        got, want = _interleaved(warm, 2, 4), _interleaved(cold, 2, 4)
        assert [[a for a, _ in chat] for chat in got] == [[a for a, _ in chat] for chat in want]
        for chat in got:
            for (_, before), (_, after) in zip(chat, chat[1:], strict=False):
                assert before.prompt_tokens <= after.prompt_tokens_details.cached_tokens \
                    < after.prompt_tokens
        # the second chat's first turn shares only the chat template's first ids with the first
        first_b = got[1][0][1]
        assert MIN_REUSE <= first_b.prompt_tokens_details.cached_tokens < first_b.prompt_tokens // 2
        assert all(u.prompt_tokens_details.cached_tokens == 0 for chat in want for _, u in chat)
    finally:
        cold.close()
        warm.close()


def test_a_small_budget_evicts_entries_and_keeps_answers(demo_dir: Path) -> None:
    """Four interleaved chats under a KV budget that holds about two of their caches: entries
    are evicted (least recently stored first) and copies count against the budget, without
    an error or a changed answer."""
    cold = load_chat_model("cold", demo_dir, dtype="float32", device="cpu", prefix_cache=False)
    per_token = cold.engine.model.kv_bytes_per_token
    tight = load_chat_model("tight", demo_dir, dtype="float32", device="cpu",
                            prefix_cache=True, kv_cache_bytes=2 * 256 * per_token)
    try:
        got, want = _interleaved(tight, 4, 3), _interleaved(cold, 4, 3)
        assert [[a for a, _ in chat] for chat in got] == [[a for a, _ in chat] for chat in want]
        assert tight.engine.prefix.hits > 0 and tight.engine.prefix.copies > 0
        assert len(tight.engine.prefix) < 4
        assert tight.engine.prefix.nbytes <= tight.engine.kv_cache_bytes
    finally:
        cold.close()
        tight.close()
