"""Config files: per-model defaults, quantize values, limits, and errors naming key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cli
from gateway.config_lines import line_of, toml_key_lines, yaml_key_lines
from gateway.settings import ConfigError, load_settings

TOML = '''\
host = "127.0.0.1"
max_running = 4
cors_origins = ["https://a.example"]

[[models]]
id = "chatglm3-6b"
path = "ckpt/chatglm3"
quantize = "int4-g128"
defaults = { temperature = 0.8, top_p = 0.8 }
max_waiting = 2

[[models]]
id = "chatglm2-6b"
path = "ckpt/chatglm2"
quantize = 8

[models.defaults]
max_tokens = 512
'''

YAML = '''\
max_waiting: 10
models:
  - id: chatglm-6b
    path: ckpt/chatglm
    quantize: 4
    defaults:
      temperature: 0.95
      top_p: 0.7
  - id: second
    path: ckpt/second
    max_running: 1
'''


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODELS", "MAX_RUNNING", "MAX_WAITING", "API_KEYS", "CORS_ORIGINS"):
        monkeypatch.delenv(f"CHATGLM_GATEWAY_{name}", raising=False)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


DEFAULT_MEMORY = {"kv_cache_bytes": None, "prefix_cache": True, "speculative": None}


def test_kv_cache_memory_and_prefix_cache_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.toml", TOML)
    args = cli.build_parser().parse_args([
        "serve", "--config", str(path), "--kv-cache-memory", "1.5", "--no-prefix-cache"])
    settings = cli.settings_from_args(args)
    limits = settings.limits(settings.models[0])
    assert limits["kv_cache_bytes"] == int(1.5 * 1024**3)
    assert limits["prefix_cache"] is False


def test_toml_defaults_quantize_and_limits(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "gateway.toml", TOML))
    first, second = settings.models
    assert first.quantize == "int4-g128" and second.quantize == "8"
    assert dict(first.defaults.given()) == {"temperature": 0.8, "top_p": 0.8}
    assert dict(second.defaults.given()) == {"max_tokens": 512}
    assert settings.limits(first) == {"max_running": 4, "max_waiting": 2, **DEFAULT_MEMORY}
    assert settings.limits(second) == {"max_running": 4, "max_waiting": 64, **DEFAULT_MEMORY}
    assert settings.cors_origins == ("https://a.example",)


def test_yaml_defaults_quantize_and_limits(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "gateway.yaml", YAML))
    first, second = settings.models
    assert first.quantize == "4"
    assert dict(first.defaults.given()) == {"temperature": 0.95, "top_p": 0.7}
    assert dict(second.defaults.given()) == {}
    assert settings.limits(second) == {"max_running": 1, "max_waiting": 10, **DEFAULT_MEMORY}


def test_cli_flags_override_limits_and_quantize(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.toml", TOML)
    args = cli.build_parser().parse_args([
        "serve", "--config", str(path), "--max-running", "2", "--max-waiting", "9",
        "--quantize", "4", "--shutdown-grace", "5", "--cors-origin", "https://b.example",
        "--api-key", "k1", "--api-key", "k2"])
    settings = cli.settings_from_args(args)
    assert (settings.max_running, settings.max_waiting, settings.shutdown_grace) == (2, 9, 5.0)
    assert [m.quantize for m in settings.models] == ["4", "4"]
    assert settings.limits(settings.models[0]) == {"max_running": 2, "max_waiting": 2,
                                                   **DEFAULT_MEMORY}
    assert settings.cors_origins == ("https://b.example",)
    assert settings.api_keys == ("k1", "k2")


@pytest.mark.parametrize(("text", "line", "key"), [
    (TOML.replace('quantize = "int4-g128"', 'quantize = "int3"'), 8, "models.0.quantize"),
    (TOML.replace("top_p = 0.8 }", "top_p = 3 }"), 9, "models.0.defaults.top_p"),
    (TOML.replace("max_tokens = 512", "max_tokens = 0"), 18, "models.1.defaults.max_tokens"),
    (TOML.replace("max_waiting = 2", "max_wait = 2"), 10, "models.0.max_wait"),
    (TOML.replace("max_running = 4", "max_running = -1"), 2, "max_running"),
    (TOML.replace('path = "ckpt/chatglm2"\n', ""), 12, "models.1.path"),
])
def test_toml_errors_name_key_and_line(tmp_path: Path, text: str, line: int, key: str) -> None:
    path = write(tmp_path, "gateway.toml", text)
    with pytest.raises(ConfigError) as failed:
        load_settings(path)
    assert f"{path}:{line}: {key}: " in str(failed.value)


@pytest.mark.parametrize(("text", "line", "key"), [
    (YAML.replace("quantize: 4", "quantize: 3"), 5, "models.0.quantize"),
    (YAML.replace("temperature: 0.95", "temperature: 9"), 7, "models.0.defaults.temperature"),
    (YAML.replace("max_running: 1", "max_running: zero"), 11, "models.1.max_running"),
    (YAML.replace("max_waiting: 10", "max_waitin: 10"), 1, "max_waitin"),
])
def test_yaml_errors_name_key_and_line(tmp_path: Path, text: str, line: int, key: str) -> None:
    path = write(tmp_path, "gateway.yaml", text)
    with pytest.raises(ConfigError) as failed:
        load_settings(path)
    assert f"{path}:{line}: {key}: " in str(failed.value)


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = TOML.replace('quantize = "int4-g128"', 'quantize = "int3"').replace(
        "max_tokens = 512", "max_tokens = 0")
    with pytest.raises(ConfigError) as failed:
        load_settings(write(tmp_path, "gateway.toml", text))
    assert len(str(failed.value).splitlines()) == 2


def test_cli_prints_the_located_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "gateway.yaml", YAML.replace("quantize: 4", "quantize: 3"))
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:5: models.0.quantize:" in err


def test_toml_scanner_tracks_tables_and_arrays() -> None:
    lines = toml_key_lines(
        'a = 1\n[server]\nport = 2 # c\n[[models]]\nid = "x"\n[[models]]\n'
        'note = """\nfake = 1\n"""\nid = "y"\n"quoted.key" = 3\n')
    assert lines[("a",)] == 1
    assert lines[("server", "port")] == 3
    assert lines[("models", 0, "id")] == 5
    assert lines[("models", 1)] == 6
    assert lines[("models", 1, "id")] == 10  # the line inside the multi-line string is skipped
    assert ("models", 1, "fake") not in lines
    assert lines[("models", 1, "quoted.key")] == 11
    assert line_of(lines, ("models", 1, "id", "deeper")) == 10
    assert line_of(lines, ("nothing",)) is None


def test_yaml_scanner_positions() -> None:
    lines = yaml_key_lines("a: 1\nlist:\n  - x: 1\n  - y: 2\n")
    assert lines[("list", 1, "y")] == 4 and lines[("list", 0)] == 3
    assert yaml_key_lines("") == {}
