"""Server and model settings: read once at start-up, then passed down (no globals).

Priority, highest first: values passed in (the CLI flags), environment variables with the
prefix ``CHATGLM_GATEWAY_`` (``CHATGLM_GATEWAY_PORT=9000``; the model list as JSON in
``CHATGLM_GATEWAY_MODELS``), the config file (TOML or YAML, ``--config PATH``), the defaults.

Example ``gateway.toml``::

    host = "127.0.0.1"
    port = 8000

    [[models]]
    id = "chatglm3-6b"
    path = "checkpoints/chatglm3-6b"
    dtype = "bfloat16"
    aliases = ["gpt-3.5-turbo"]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "CHATGLM_GATEWAY_"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


class ModelEntry(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="The model name clients send in 'model'.")
    path: Path = Field(description="The checkpoint folder (THUDM layout: config.json, weights, "
                       "tokenizer files).")
    family: str | None = Field(default=None, description="chatglm, chatglm2 or chatglm3; "
                               "None = detect from config.json.")
    dtype: Dtype = Field(default="auto", description="Compute dtype; auto = float32 on CPU.")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps.")
    quantize: Literal["4", "8"] | None = Field(
        default=None, description="Weight-only quantization on load: '4' or '8' bits.")
    system_policy: Literal["prepend", "reject"] = Field(
        default="prepend", description="What to do with system messages for models without a "
        "system role (ChatGLM-6B, ChatGLM2-6B).")
    aliases: tuple[str, ...] = Field(default=(), description="Other names for this model.")
    description: str = Field(default="", description="Shown in /v1/models; default: the "
                             "family's description.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError("device must be auto, cpu, mps, cuda or cuda:N")
        return v

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize_as_text(cls, v: Any) -> Any:
        # TOML/YAML/env give 4 or 8 as numbers.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class ServerSettings(BaseSettings):
    """Everything the server needs to start."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field(default="127.0.0.1", description="Bind address (local only by default).")
    port: int = Field(default=8000, ge=0, le=65535)
    models: tuple[ModelEntry, ...] = Field(default=(), description="The models to serve.")
    log_level: LogLevel = "info"
    sse_ping_seconds: float = Field(
        default=15.0, ge=0, description="Keep-alive comment interval on streams (0 = off).")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _unique_names(self) -> ServerSettings:
        seen: set[str] = set()
        for entry in self.models:
            for name in (entry.id, *entry.aliases):
                if name in seen:
                    raise ValueError(f"model name '{name}' is used twice")
                seen.add(name)
        return self


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServerSettings:
    """Build settings from ``overrides`` > environment > ``config_file`` > defaults."""
    if config_file is None:
        return ServerSettings(**overrides)
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"config file must be .toml, .yaml or .yml: {path}")

    class _WithFile(ServerSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            file_source: PydanticBaseSettingsSource = (
                TomlConfigSettingsSource(settings_cls, toml_file=path)
                if suffix == ".toml"
                else YamlConfigSettingsSource(settings_cls, yaml_file=path)
            )
            return init_settings, env_settings, file_source

    return ServerSettings.model_validate(_WithFile(**overrides).model_dump())
