"""GET /metrics: Prometheus text that parses, per-model gauges, counters and histograms."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.settings import ServerSettings
from tests.fake import FakeChatModel
from tests.server import running_server

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def scrape(get: object) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` from the exposition text."""
    response = get("/metrics")  # type: ignore[operator]
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


@pytest.fixture()
def client() -> Iterator[TestClient]:
    models = {"a": FakeChatModel("a", reply="abcdef", piece_chars=2),
              "b": FakeChatModel("b", reply="xyz", prepare_error=None)}
    with TestClient(create_app(ServerSettings(), models=models),
                    raise_server_exceptions=False, base_url="http://localhost") as c:
        yield c


def test_families_and_types(client: TestClient) -> None:
    text = client.get("/metrics").text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["chatglm_gateway_requests_running"] == "gauge"
    assert families["chatglm_gateway_requests_waiting"] == "gauge"
    assert families["chatglm_gateway_requests"] == "counter"
    assert families["chatglm_gateway_generated_tokens"] == "counter"
    assert families["chatglm_gateway_prompt_tokens"] == "counter"
    assert families["chatglm_gateway_time_to_first_token_seconds"] == "histogram"
    assert families["chatglm_gateway_time_per_output_token_seconds"] == "histogram"
    samples = scrape(client.get)
    assert samples["chatglm_gateway_requests_running"] == {(("model", "a"),): 0.0,
                                                           (("model", "b"),): 0.0}


def test_counters_after_requests(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
    assert client.post("/v1/completions", json={"model": "a", "prompt": "hi", "n": 2}
                       ).status_code == 200
    assert client.post("/", json={"prompt": "hi"}).status_code == 200
    assert client.post("/v1/chat/completions", json={"model": "nope", **CHAT}).status_code == 404
    assert client.post("/v1/chat/completions", json={"model": "a"}).status_code == 400
    assert client.post("/v1/chat/completions", json={"model": "a", **CHAT,
                                                     "max_tokens": 10**6}).status_code == 400
    samples = scrape(client.get)
    requests = samples["chatglm_gateway_requests_total"]
    assert requests[(("endpoint", "chat"), ("model", "a"), ("status", "200"))] == 1
    assert requests[(("endpoint", "completions"), ("model", "a"), ("status", "200"))] == 1
    assert requests[(("endpoint", "legacy"), ("model", "a"), ("status", "200"))] == 1
    assert requests[(("endpoint", "chat"), ("model", ""), ("status", "404"))] == 1
    assert requests[(("endpoint", "chat"), ("model", ""), ("status", "400"))] == 1
    # the model was resolved before prepare refused the context: labelled with it
    assert requests[(("endpoint", "chat"), ("model", "a"), ("status", "400"))] == 1
    # 3 pieces per generation, 4 generations (chat, 2 completion choices, legacy)
    assert samples["chatglm_gateway_generated_tokens_total"][(("model", "a"),)] == 12
    prompt = len("user: hi")
    assert samples["chatglm_gateway_prompt_tokens_total"][(("model", "a"),)] == 4 * prompt
    ttft = samples["chatglm_gateway_time_to_first_token_seconds_count"]
    assert ttft[(("model", "a"),)] == 4
    tpot = samples["chatglm_gateway_time_per_output_token_seconds_count"]
    assert tpot[(("model", "a"),)] == 4
    assert samples["chatglm_gateway_time_to_first_token_seconds_bucket"][
        (("le", "+Inf"), ("model", "a"))] == 4


def test_running_gauge_and_latency_while_streaming() -> None:
    slow = FakeChatModel("slow", reply="abcdefgh", delay=0.05)
    app = create_app(ServerSettings(), models={"slow": slow})
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/chat/completions",
                         json={"model": "slow", "stream": True, **CHAT}) as response:
            lines = response.iter_lines()
            next(lines)
            during = scrape(http.get)
            list(lines)
        after = scrape(http.get)
    assert during["chatglm_gateway_requests_running"][(("model", "slow"),)] == 1
    assert after["chatglm_gateway_requests_running"][(("model", "slow"),)] == 0
    label = (("model", "slow"),)
    ttft_sum = after["chatglm_gateway_time_to_first_token_seconds_sum"][label]
    assert 0.04 <= ttft_sum < 2  # one 0.05 s piece before the first text
    tpot_sum = after["chatglm_gateway_time_per_output_token_seconds_sum"][label]
    assert 0.04 <= tpot_sum < 1  # ~0.05 s between pieces
    assert after["chatglm_gateway_requests_total"][
        (("endpoint", "chat"), ("model", "slow"), ("status", "200"))] == 1


def test_each_app_has_its_own_registry() -> None:
    first = TestClient(create_app(ServerSettings(), models={"m": FakeChatModel("m")}),
                       base_url="http://localhost")
    second = TestClient(create_app(ServerSettings(), models={"m": FakeChatModel("m")}),
                        base_url="http://localhost")
    first.post("/v1/chat/completions", json={"model": "m", **CHAT})
    assert "chatglm_gateway_requests_total" in scrape(first.get)
    assert "chatglm_gateway_requests_total" not in scrape(second.get)


def test_metrics_of_the_demo_checkpoint(tmp_path: object) -> None:
    from pathlib import Path

    from adapters.demo import ensure_demo_checkpoint
    from adapters.registry import load_chat_model

    model = load_chat_model("demo", ensure_demo_checkpoint(Path(str(tmp_path))), device="cpu",
                            dtype="float32")
    try:
        with running_server(create_app(ServerSettings(), models={"demo": model})) as url, \
                openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client, \
                httpx.Client(base_url=url) as http:
            reply = client.chat.completions.create(model="demo", max_tokens=5, temperature=0,
                                                   **CHAT)  # type: ignore[arg-type]
            samples = scrape(http.get)
        assert reply.usage is not None
        label = (("model", "demo"),)
        assert samples["chatglm_gateway_generated_tokens_total"][label] == \
            reply.usage.completion_tokens
        assert samples["chatglm_gateway_prompt_tokens_total"][label] == reply.usage.prompt_tokens
        assert samples["chatglm_gateway_requests_running"][label] == 0
        assert samples["chatglm_gateway_requests_waiting"][label] == 0
    finally:
        model.close()
