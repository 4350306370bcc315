"""Prometheus metrics of one app, on its own ``CollectorRegistry`` (tests build many apps).

``prometheus_client`` writes the exposition format (escaping, ``_total``/``_bucket`` series,
``# HELP``/``# TYPE`` lines) that Prometheus and every scraper parse; writing it by hand is an
easy place for subtle format bugs.

* ``chatglm_gateway_requests_running`` / ``_waiting`` (gauges, label ``model``): read from each
  model's ``status()`` at scrape time by :class:`_SchedulerCollector`;
* ``chatglm_gateway_kv_cache_usage_ratio`` and ``_prefix_cache_hit_rate`` (gauges, label
  ``model``; what an autoscaler or an external router reads), from the same ``status()``: summed
  over replicas with ``--ray``, where ``chatglm_gateway_replicas`` counts the live replicas;
  ``chatglm_gateway_generations_cancelled_total`` (label ``model``): generations the engines
  dropped because their client left;
* ``chatglm_gateway_speculative_draft_tokens_total`` / ``_speculative_accepted_tokens_total``
  (counters, label ``model``, only for models with speculative decoding): draft ids verified and
  those accepted, read from ``status()`` at scrape time (their ratio is the acceptance rate);
* ``chatglm_gateway_requests_total`` (label ``model``, ``endpoint``, ``status``): every request to
  a model endpoint, by HTTP status (``model`` is empty when the request named no served model);
* ``chatglm_gateway_prompt_tokens_total`` / ``_generated_tokens_total`` (label ``model``), counted
  per generation when it finishes (a request with ``n`` choices counts its prompt ``n`` times:
  the engine processes it once per choice);
* ``chatglm_gateway_time_to_first_token_seconds`` and ``_time_per_output_token_seconds``
  (histograms, label ``model``), measured at the gateway as the deltas arrive: from the request's
  start to the first text, and (last delta - first text) / (completion tokens - 1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from adapters.base import ChatModel, Delta
from adapters.distributed import Replicated

logger = logging.getLogger(__name__)

PREFIX = "chatglm_gateway"
# vLLM's buckets for the same two histograms: CPU and GPU latencies both fall inside.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)

#: (method, path) of the endpoints that reach a model -> the ``endpoint`` label
MODEL_ENDPOINTS = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/v1/responses"): "responses",
    ("POST", "/"): "legacy",  # ChatGLM's own API; the label is part of the metrics' contract
}


class _SchedulerCollector(Collector):
    """Running / waiting requests per model, asked from the models when scraped."""

    def __init__(self, models: Callable[[], Iterable[tuple[str, ChatModel]]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(f"{PREFIX}_requests_running",
                                    "Requests being decoded by the model's engine.",
                                    labels=["model"])
        waiting = GaugeMetricFamily(f"{PREFIX}_requests_waiting",
                                    "Requests queued for a decoding slot.", labels=["model"])
        kv_usage = GaugeMetricFamily(
            f"{PREFIX}_kv_cache_usage_ratio", "Share of the KV-cache budget held by running "
            "requests and the prefix cache (summed over replicas).", labels=["model"])
        hit_rate = GaugeMetricFamily(
            f"{PREFIX}_prefix_cache_hit_rate", "Prompt tokens whose KV came from the prefix "
            "cache, of all prompt tokens looked up (since start, over replicas).",
            labels=["model"])
        cancelled = CounterMetricFamily(
            f"{PREFIX}_generations_cancelled", "Generations closed before they finished "
            "(clients that left), counted by the engines.", labels=["model"])
        replicas = GaugeMetricFamily(f"{PREFIX}_replicas",
                                     "Replicas serving the model (with --ray).", labels=["model"])
        drafted = CounterMetricFamily(f"{PREFIX}_speculative_draft_tokens",
                                      "Draft tokens verified (speculative decoding).",
                                      labels=["model"])
        accepted = CounterMetricFamily(f"{PREFIX}_speculative_accepted_tokens",
                                       "Draft tokens accepted (speculative decoding).",
                                       labels=["model"])
        for model_id, model in self._models():
            status = model.status()
            running.add_metric([model_id], status.get("running", 0))
            waiting.add_metric([model_id], status.get("waiting", 0))
            if status.get("kv_cache_bytes"):
                kv_usage.add_metric([model_id], status.get("kv_cache_used_bytes", 0)
                                    / status["kv_cache_bytes"])
            if "prefix_cache_queried_tokens" in status:
                queried = status["prefix_cache_queried_tokens"]
                hit_rate.add_metric([model_id], status.get("prefix_cache_hit_tokens", 0)
                                    / queried if queried else 0.0)
            if "cancelled" in status:
                cancelled.add_metric([model_id], status["cancelled"])
            if isinstance(model, Replicated):
                replicas.add_metric([model_id], len(model.replicas()))
            if "speculative_drafted" in status:
                drafted.add_metric([model_id], status["speculative_drafted"])
                accepted.add_metric([model_id], status.get("speculative_accepted", 0))
        yield running
        yield waiting
        yield kv_usage
        yield hit_rate
        yield cancelled
        yield replicas
        yield drafted
        yield accepted


class GatewayMetrics:
    def __init__(self, models: Callable[[], Iterable[tuple[str, ChatModel]]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(models))
        self.requests = Counter(f"{PREFIX}_requests", "Model requests by HTTP status.",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.",
                                     ["model"], registry=self.registry)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated.",
                                        ["model"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "From the request's start to its first text.", ["model"],
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Mean time per output token after the first, per generation.",
                              ["model"], buckets=TPOT_BUCKETS, registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def measure(self, model_id: str, generation: AsyncIterator[Delta],
                      started: float) -> AsyncIterator[Delta]:
        """Relay ``generation`` unchanged, timing its deltas; closing this closes it."""
        first: float | None = None
        try:
            async for delta in generation:
                if first is None and delta.text:
                    first = time.monotonic()
                    self.ttft.labels(model_id).observe(first - started)
                if delta.finish_reason is not None and delta.usage is not None:
                    self._finished(model_id, delta, first)
                yield delta
        finally:
            aclose = getattr(generation, "aclose", None)
            if aclose is not None:
                await aclose()

    def _finished(self, model_id: str, delta: Delta, first: float | None) -> None:
        usage = delta.usage
        assert usage is not None
        self.prompt_tokens.labels(model_id).inc(usage.prompt_tokens)
        self.generated_tokens.labels(model_id).inc(usage.completion_tokens)
        if first is not None and usage.completion_tokens > 1:
            self.tpot.labels(model_id).observe(
                (time.monotonic() - first) / (usage.completion_tokens - 1))


class RequestCounter:
    """ASGI middleware: counts each model-endpoint request by its response status.

    The route stores the resolved model id in ``scope["state"]["model"]`` (``request.state``).
    """

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        endpoint = (MODEL_ENDPOINTS.get((scope.get("method", ""), scope.get("path", "")))
                    if scope["type"] == "http" else None)
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        started = False

        def record(status: int) -> None:
            model = str(scope.get("state", {}).get("model", ""))
            self.metrics.requests.labels(model, endpoint, str(status)).inc()

        async def send_and_record(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                # Counted when the status is sent, not when the app returns: a client that
                # read the whole body may scrape before the app's call has unwound.
                started = True
                record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if not started:
                record(500)  # an exception before any response start is a 500 to the client
