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
    quantize = "int4-g128"
    defaults = { temperature = 0.8, top_p = 0.8 }
    speculative = { method = "ngram", num_speculative_tokens = 4 }

Errors in the file name the key and its line (``gateway.toml:9: models.0.quantize: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from gateway.config_lines import key_lines, line_of

ENV_PREFIX = "CHATGLM_GATEWAY_"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
Quantize = Literal["4", "8", "int4-g128"]
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def _comma_separated(v: Any) -> Any:
    """Environment values are ``a,b,c`` (``CHATGLM_GATEWAY_API_KEYS=k1,k2``); files give lists."""
    if isinstance(v, str):
        return tuple(part.strip() for part in v.split(",") if part.strip())
    return v


class SamplingDefaults(BaseModel):
    """A model's defaults for the sampling fields a request leaves out.

    Without them OpenAI's semantics apply (temperature 1, top_p 1, no max_tokens on chat, 16 on
    legacy completions).  THUDM's own ``chat()`` uses temperature 0.8 / top_p 0.8 (ChatGLM2/3) or
    0.95 / 0.7 (ChatGLM-6B): set those here to reproduce THUDM's demos.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)

    def given(self) -> Mapping[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class SpeculativeSettings(BaseModel):
    """Speculative decoding by prompt lookup (names as vLLM's ``speculative_config``): draft
    ids are copied from the prompt and the answer so far and verified in one forward; output
    is unchanged (greedy and seeded sampling alike), only faster when the answer repeats text.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ngram", "off"] = Field(
        default="ngram", description="'ngram' (prompt lookup) or 'off' (one token per step).")
    num_speculative_tokens: int = Field(
        default=4, ge=1, le=16, description="Draft ids verified per step at most.")
    prompt_lookup_max: int = Field(
        default=4, ge=1, le=16, description="Longest suffix n-gram looked up in the sequence.")
    prompt_lookup_min: int = Field(
        default=2, ge=1, le=16, description="Shortest suffix n-gram looked up.")

    @model_validator(mode="after")
    def _ordered(self) -> SpeculativeSettings:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must not exceed prompt_lookup_max")
        return self

    def engine_options(self) -> dict[str, Any] | None:
        """The options of ``adapters.runtime.speculative.SpeculativeConfig`` (None: off)."""
        if self.method == "off":
            return None
        return self.model_dump()


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
    quantize: Quantize | None = Field(
        default=None, description="Weight-only quantization on load: '8' or '4' (THUDM's "
        "per-row int8/int4) or 'int4-g128' (int4 with a scale per 128 columns).")
    int8_activations: bool = Field(
        default=False, description="Opt-in, not exact: prefill chunks and decode batches of 64 "
        "or more rows quantise activations per token to int8 and multiply on AVX512-VNNI "
        "(int4/int8 weights on the native CPU kernels; elsewhere a warning and exact "
        "computation).  Off: THUDM's numerics.")
    system_policy: Literal["prepend", "reject"] = Field(
        default="prepend", description="What to do with system messages for models without a "
        "system role (ChatGLM-6B, ChatGLM2-6B).")
    aliases: tuple[str, ...] = Field(default=(), description="Other names for this model.")
    description: str = Field(default="", description="Shown in /v1/models; default: the "
                             "family's description.")
    defaults: SamplingDefaults = Field(
        default_factory=SamplingDefaults,
        description="Sampling values used when a request omits them.")
    max_running: int | None = Field(
        default=None, ge=1, description="Requests decoded together; default: the server's.")
    max_waiting: int | None = Field(
        default=None, ge=0, description="Requests queued beyond max_running before 429; "
        "default: the server's.")
    kv_cache_memory: float | None = Field(
        default=None, gt=0, description="GiB of KV cache (running requests + prefix reuse); "
        "default: the server's.")
    prefix_cache: bool | None = Field(
        default=None, description="Reuse the KV cache of earlier turns; default: the server's.")
    # ---- with --ray: how the model spreads over the Ray cluster (ignored otherwise)
    replicas: int | None = Field(
        default=None, ge=1, description="Ray Serve replicas of this model; default: the "
        "server's (--replicas).")
    min_replicas: int | None = Field(
        default=None, ge=0, description="Autoscaling (with max_replicas): the fewest replicas.")
    max_replicas: int | None = Field(
        default=None, ge=1, description="Autoscaling on: Ray Serve adds replicas up to this "
        "many while requests queue.")
    target_ongoing_requests: float | None = Field(
        default=None, gt=0, description="Autoscaling: requests in flight per replica to aim "
        "at; default: max_running.")
    num_cpus: float | None = Field(
        default=None, ge=0, description="CPUs each replica reserves in Ray (default 1).")
    num_gpus: float | None = Field(
        default=None, ge=0, description="GPUs each replica reserves in Ray (default 0).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica reserves (pins "
        "replicas to the nodes started with them: `ray start --resources`).")
    affinity: bool = Field(
        default=True, description="With ray: send each conversation's turns to the replica "
        "holding its prefix cache (else Ray Serve's default, load-only routing).")
    speculative: SpeculativeSettings | None = Field(
        default=None, description="Speculative decoding by prompt lookup; default: the "
        "server's.")

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
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), repr=False, description="Accepted bearer keys (none = no authentication); "
        "comma-separated in the environment.")
    api_key_file: Path | None = Field(
        default=None, description="A file of accepted keys, one per line (# starts a comment); "
        "added to api_keys.")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Origins allowed by CORS (none = CORS off); '*' allows any.")
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Host names accepted besides loopback ones while bound to a "
        "loopback address (DNS-rebinding protection); comma-separated in the environment.")
    max_request_bytes: int = Field(
        default=4 * 1024**2, ge=1024, description="Largest request body (bytes); larger is 413.")
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="Seconds running requests may take to finish on "
        "SIGTERM/SIGINT before they are cancelled.")
    max_running: int = Field(default=8, ge=1, description="Per model: requests decoded "
                             "together (one batch).")
    max_waiting: int = Field(default=64, ge=0, description="Per model: requests queued beyond "
                             "max_running; more are answered 429.")
    kv_cache_memory: float | None = Field(
        default=None, gt=0, description="Per model: GiB of KV cache for running requests and "
        "the prefix-reuse store (default: a quarter of RAM up to 8 GiB on CPU, half the free "
        "memory on CUDA).")
    prefix_cache: bool = Field(default=True, description="Per model: keep recent "
                               "conversations' KV cache and reuse the longest shared prefix.")
    ray: bool = Field(default=False, description="Run each model's engine in Ray Serve "
                      "replicas; this process serves the HTTP API (pip install "
                      "'chatglm-gateway[ray]').")
    ray_address: str | None = Field(
        default=None, description="With ray: the Ray cluster to join (e.g. 'auto' or "
        "'HEAD_IP:6379'); none = start a local cluster, stopped with the server.")
    replicas: int = Field(default=1, ge=1, description="With ray: replicas per model (a "
                          "model's own 'replicas' wins).")
    speculative: SpeculativeSettings | None = Field(
        default=None, description="Per model: speculative decoding by prompt lookup "
        "(--speculative ngram); off by default.")

    @field_validator("api_keys", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return _comma_separated(v)

    @field_validator("api_keys")
    @classmethod
    def _no_blank_key(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not key.strip() for key in v):
            raise ValueError("API keys must not be blank")
        return v

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

    @model_validator(mode="after")
    def _address_means_ray(self) -> ServerSettings:
        if self.ray_address is not None:
            self.ray = True
        return self

    @model_validator(mode="after")
    def _read_key_file(self) -> ServerSettings:
        if self.api_key_file is not None:
            self.api_keys = (*self.api_keys, *read_key_file(self.api_key_file))
            self.api_key_file = None  # read once: a copy of these settings must not add twice
        return self

    def limits(self, entry: ModelEntry) -> dict[str, Any]:
        """The scheduler limits of one model (its own, else the server's), as keyword
        arguments of ``adapters.registry.load_chat_model``."""
        gib = entry.kv_cache_memory if entry.kv_cache_memory is not None else self.kv_cache_memory
        return {
            "max_running": entry.max_running if entry.max_running is not None
            else self.max_running,
            "max_waiting": entry.max_waiting if entry.max_waiting is not None
            else self.max_waiting,
            "kv_cache_bytes": None if gib is None else int(gib * 1024**3),
            "prefix_cache": entry.prefix_cache if entry.prefix_cache is not None
            else self.prefix_cache,
            "speculative": (entry.speculative or self.speculative or _OFF).engine_options(),
        }

    def scale(self, entry: ModelEntry) -> dict[str, Any]:
        """How ``entry`` spreads over a Ray cluster, as keyword arguments of
        ``adapters.distributed.ScaleOptions``."""
        given = {k: v for k, v in (
            ("min_replicas", entry.min_replicas), ("max_replicas", entry.max_replicas),
            ("target_ongoing_requests", entry.target_ongoing_requests),
            ("num_cpus", entry.num_cpus), ("num_gpus", entry.num_gpus)) if v is not None}
        return {"replicas": entry.replicas if entry.replicas is not None else self.replicas,
                "resources": dict(entry.resources), "affinity": entry.affinity, **given}


_OFF = SpeculativeSettings(method="off")


def read_key_file(path: Path) -> tuple[str, ...]:
    """One key per line; blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read the API key file {path}: {err.strerror}") from None
    keys = tuple(
        stripped for line in text.splitlines()
        if (stripped := line.split("#", 1)[0].strip())
    )
    if not keys:
        raise ValueError(f"the API key file {path} holds no key")
    return keys


class ConfigError(ValueError):
    """Invalid settings, each problem named by its key (and line, when it is in the file)."""


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

    try:
        return ServerSettings.model_validate(_WithFile(**overrides).model_dump())
    except ValidationError as err:
        raise config_error(err, path, suffix) from None


def config_error(err: ValidationError, path: Path, suffix: str) -> ConfigError:
    """``path:LINE: key.path: message`` per problem; the line is found by scanning the file
    for the key (pydantic gives the key path, never a position)."""
    lines = key_lines(path.read_text(encoding="utf-8"), suffix)
    problems = []
    for error in err.errors(include_url=False):
        loc = tuple(error["loc"])
        key = ".".join(str(part) for part in loc) or "(settings)"
        line = line_of(lines, loc)
        where = f"{path}:{line}" if line is not None else f"{path}"
        problems.append(f"{where}: {key}: {error['msg']}")
    return ConfigError("\n".join(problems))
