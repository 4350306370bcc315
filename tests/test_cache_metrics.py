"""``/metrics`` of the single-process server reports the engine's KV-cache usage, prefix-cache
hit rate and cancelled generations (what an autoscaler or external router reads), from a real
tiny ChatGLM2 checkpoint served on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.conftest import checkpoint_dir
from tests.server import running_server


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    settings = ServerSettings(models=(ModelEntry(
        id="glm2", path=checkpoint_dir("chatglm2-6b-tiny"), dtype="float32", device="cpu"),))
    with running_server(create_app(settings), timeout=60, wait_ready=True) as url:
        yield url


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    line = next(line for line in text.splitlines() if line.startswith(f'{name}{{model="glm2"}}'))
    return float(line.split()[-1])


def test_prefix_hits_and_kv_usage_follow_a_conversation(base_url: str) -> None:
    assert _metric(base_url, "chatglm_gateway_prefix_cache_hit_rate") == 0.0
    messages = [{"role": "user", "content": "Tell me about the rivers of the world, please."}]
    prompts = []
    for _ in range(2):
        r = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
            "model": "glm2", "messages": messages, "temperature": 0, "max_tokens": 8})
        prompts.append(r.json()["usage"]["prompt_tokens"])
        messages += [r.json()["choices"][0]["message"], {"role": "user", "content": "More?"}]
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    # the second turn took its history from the cache: hit tokens / prompt tokens looked up
    assert cached > 0
    assert _metric(base_url, "chatglm_gateway_prefix_cache_hit_rate") == pytest.approx(
        cached / sum(prompts))
    # the finished turns' caches are kept for reuse: part of the budget is held
    assert 0 < _metric(base_url, "chatglm_gateway_kv_cache_usage_ratio") < 1


def test_a_client_that_leaves_is_counted_as_cancelled(base_url: str) -> None:
    before = _metric(base_url, "chatglm_gateway_generations_cancelled_total")
    body = {"model": "glm2", "messages": [{"role": "user", "content": "go on and on"}],
            "stream": True, "max_tokens": 400, "logit_bias": {"2": -100}}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        for _, _line in zip(range(5), response.iter_lines(), strict=False):
            pass
    deadline = time.monotonic() + 10
    while _metric(base_url, "chatglm_gateway_generations_cancelled_total") != before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _metric(base_url, "chatglm_gateway_requests_running") == 0


def test_interleaved_chats_each_keep_their_history_in_the_cache(base_url: str) -> None:
    """Two chats alternating turn by turn on one server (what conversation affinity sends one
    replica): from the second turn on, each takes its whole previous prompt from the cache."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    chats: list[list[dict[str, str]]] = [[], []]
    previous = [0, 0]
    for turn in range(3):
        for c, messages in enumerate(chats):
            messages.append({"role": "user", "content": f"Chat {c}, turn {turn}: and rivers?"})
            r = client.chat.completions.create(model="glm2", messages=messages, max_tokens=8,
                                               temperature=0)  # type: ignore[arg-type]
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            cached = r.usage.prompt_tokens_details.cached_tokens or 0
            if turn:
                assert previous[c] <= cached < r.usage.prompt_tokens
            previous[c] = r.usage.prompt_tokens
            messages.append({"role": "assistant", "content": r.choices[0].message.content or ""})
