"""The command line: argument contract, settings precedence, the demo fallback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.settings import ServerSettings, load_settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOST", "PORT", "MODELS", "LOG_LEVEL", "SSE_PING_SECONDS", "API_KEYS",
                 "API_KEY_FILE", "CORS_ORIGINS", "MAX_RUNNING", "MAX_WAITING", "SHUTDOWN_GRACE"):
        monkeypatch.delenv(f"CHATGLM_GATEWAY_{name}", raising=False)


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> list[ServerSettings]:
    """Capture what ``serve`` would run instead of starting uvicorn."""
    seen: list[ServerSettings] = []
    monkeypatch.setattr(cli, "serve", lambda settings: seen.append(settings) or 0)
    return seen


def settings_for(argv: list[str]) -> ServerSettings:
    return cli.settings_from_args(cli.build_parser().parse_args(argv))


def test_serve_flags(served: list[ServerSettings], tmp_path: Path) -> None:
    assert cli.main(["serve", "--model", f"glm={tmp_path}", "--model", "b=x=y", "--dtype",
                     "bfloat16", "--device", "cpu", "--host", "0.0.0.0", "--port", "9001",
                     "--log-level", "debug"]) == 0
    (settings,) = served
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 9001, "debug")
    assert [(m.id, str(m.path), m.dtype, m.device) for m in settings.models] == [
        ("glm", str(tmp_path), "bfloat16", "cpu"), ("b", "x=y", "bfloat16", "cpu")]


@pytest.mark.parametrize("bad", [["serve", "--model", "nopath"], ["serve", "--model", "=p"],
                                 ["serve", "--dtype", "int4"], [], ["serve", "--port", "x"]])
def test_bad_arguments_exit_2(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(bad)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_invalid_device_is_reported(served: list[ServerSettings],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--model", "a=p", "--device", "tpu"]) == 2
    assert "device" in capsys.readouterr().err
    assert served == []


def test_toml_config_env_and_flags_precedence(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        'host = "127.0.0.2"\nport = 8100\nlog_level = "WARNING"\n\n'
        '[[models]]\nid = "chatglm3-6b"\npath = "ckpt/chatglm3"\nquantize = 4\n'
        'aliases = ["gpt-3.5-turbo"]\n',
        encoding="utf-8",
    )
    from_file = settings_for(["serve", "--config", str(config)])
    assert (from_file.host, from_file.port, from_file.log_level) == ("127.0.0.2", 8100, "warning")
    (entry,) = from_file.models
    assert (entry.id, entry.path, entry.quantize, entry.aliases) == (
        "chatglm3-6b", Path("ckpt/chatglm3"), "4", ("gpt-3.5-turbo",))

    monkeypatch.setenv("CHATGLM_GATEWAY_PORT", "8200")
    assert settings_for(["serve", "--config", str(config)]).port == 8200  # env > file
    assert settings_for(["serve", "--config", str(config), "--port", "8300"]).port == 8300
    replaced = settings_for(["serve", "--config", str(config), "--model", "x=y", "--dtype",
                             "float16"])
    assert [(m.id, m.dtype) for m in replaced.models] == [("x", "float16")]


def test_yaml_config(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: 8101\nmodels:\n  - id: a\n    path: /models/a\n    family: chatglm2\n"
                      "    system_policy: reject\n", encoding="utf-8")
    settings = load_settings(config)
    assert settings.port == 8101
    assert settings.models[0].family == "chatglm2"
    assert settings.models[0].system_policy == "reject"


def test_models_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGLM_GATEWAY_MODELS", '[{"id": "e", "path": "p", "device": "cuda:1"}]')
    assert [(m.id, m.device) for m in ServerSettings().models] == [("e", "cuda:1")]


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "gateway.ini"
    bad.write_text("", encoding="utf-8")
    with pytest.raises(ValueError):
        load_settings(bad)
    duplicate = tmp_path / "dup.toml"
    duplicate.write_text('[[models]]\nid = "a"\npath = "p"\n[[models]]\nid = "b"\npath = "q"\n'
                         'aliases = ["a"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="used twice"):
        load_settings(duplicate)


def test_no_model_serves_the_demo_with_a_warning(
    served: list[ServerSettings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import adapters.demo

    asked: list[Any] = []
    demo_path = tmp_path / "demo"

    def ensure_demo_checkpoint(cache_dir: Path) -> Path:
        asked.append(cache_dir)
        return demo_path

    monkeypatch.setattr(adapters.demo, "ensure_demo_checkpoint", ensure_demo_checkpoint)
    monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="gateway.cli"):
        assert cli.main(["serve", "--device", "cpu"]) == 0
    assert asked == [tmp_path / "cache"]
    (entry,) = served[0].models
    assert (entry.id, entry.path, entry.device) == ("chatglm2-demo", demo_path, "cpu")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "meaningless" in warning and "--model NAME=PATH" in warning


def test_demo_cache_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import adapters.demo

    asked: list[Path] = []
    monkeypatch.setattr(adapters.demo, "ensure_demo_checkpoint",
                        lambda cache_dir: asked.append(cache_dir) or tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(cli.CACHE_ENV, raising=False)
    cli.with_demo_model(ServerSettings(), {})
    assert asked == [tmp_path / ".cache" / "chatglm-gateway"]


def test_python_dash_m_help() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    for flag in ("--model ID=PATH", "--dtype", "--device", "--host", "--port", "--config",
                 "--log-level"):
        assert flag in done.stdout
