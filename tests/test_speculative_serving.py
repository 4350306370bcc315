"""``--speculative ngram`` and the config file's per-model ``speculative`` table, and the gateway
serving a model with speculation: same answers as without, draft / accepted counters on
/metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from adapters.demo import ensure_demo_checkpoint
from gateway import cli
from gateway.app import create_app
from gateway.settings import (
    ConfigError,
    ModelEntry,
    ServerSettings,
    SpeculativeSettings,
    load_settings,
)
from tests.server import running_server
from tests.test_metrics import scrape

TOML = """
[[models]]
id = "a"
path = "ckpt/a"
speculative = { method = "ngram", num_speculative_tokens = 6, prompt_lookup_max = 5 }

[[models]]
id = "b"
path = "ckpt/b"
"""

DEFAULTS = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}


def test_config_file_sets_speculation_per_model(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(TOML, encoding="utf-8")
    settings = load_settings(path)
    a, b = settings.models
    assert settings.limits(a)["speculative"] == {**DEFAULTS, "num_speculative_tokens": 6,
                                                 "prompt_lookup_max": 5}
    assert settings.limits(b)["speculative"] is None  # off by default


def test_flags_turn_speculation_on_or_off_for_every_model(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(TOML, encoding="utf-8")

    def limits(*flags: str) -> list[object]:
        args = cli.build_parser().parse_args(["serve", "--config", str(path), *flags])
        settings = cli.settings_from_args(args)
        return [settings.limits(m)["speculative"] for m in settings.models]

    a = {**DEFAULTS, "num_speculative_tokens": 6, "prompt_lookup_max": 5}
    assert limits("--speculative", "ngram") == [a, DEFAULTS]
    assert limits("--speculative", "ngram", "--num-speculative-tokens", "3") == [
        {**a, "num_speculative_tokens": 3}, {**DEFAULTS, "num_speculative_tokens": 3}]
    assert limits("--speculative", "off") == [None, None]
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        limits("--speculative", "ngram", "--prompt-lookup-min", "5")


def test_bad_speculative_table_names_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(TOML.replace("num_speculative_tokens = 6", "num_speculative_tokens = 0"),
                    encoding="utf-8")
    with pytest.raises(ConfigError, match=r"gateway.toml:5: "
                       r"models.0.speculative.num_speculative_tokens"):
        load_settings(path)


def test_served_with_speculation_answers_as_without_and_counts_drafts(tmp_path: Path) -> None:
    folder = ensure_demo_checkpoint(tmp_path)
    spec = SpeculativeSettings(prompt_lookup_min=1)
    settings = ServerSettings(models=(
        ModelEntry(id="plain", path=folder, dtype="float32", device="cpu"),
        ModelEntry(id="fast", path=folder, dtype="float32", device="cpu", speculative=spec)))
    with running_server(create_app(settings), timeout=60, wait_ready=True) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        text = "Repeat after me: the quick brown fox jumps over the lazy dog. " * 3
        for params in ({"temperature": 0}, {"temperature": 0.9, "seed": 5}):
            answers = [client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}], max_tokens=32,
                logprobs=True, **params) for model in ("plain", "fast")]
            plain, fast = (a.choices[0] for a in answers)
            assert fast.message.content == plain.message.content
            # the same tokens; fp32 logprobs equal up to summation order (a verification
            # row is a [k+1]-row matmul; bf16 on the native kernels is bit for bit)
            pairs = list(zip(fast.logprobs.content, plain.logprobs.content, strict=True))
            assert all(f.token == p.token and f.bytes == p.bytes for f, p in pairs)
            assert all(abs(f.logprob - p.logprob) < 1e-4 for f, p in pairs)
            assert answers[1].usage == answers[0].usage
        with httpx.Client(base_url=url) as http:
            samples = scrape(http.get)
    drafted = samples["chatglm_gateway_speculative_draft_tokens_total"]
    accepted = samples["chatglm_gateway_speculative_accepted_tokens_total"]
    assert set(drafted) == set(accepted) == {(("model", "fast"),)}  # only where it is on
    assert drafted[(("model", "fast"),)] >= accepted[(("model", "fast"),)] > 0
