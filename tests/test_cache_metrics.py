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
