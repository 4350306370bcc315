"""``chatglm-gateway serve``: the command line (a stable contract; see ``--help``).

::

    chatglm-gateway serve --model ID=PATH [--model ID=PATH ...] [--dtype float32|bfloat16|float16]
                          [--device cpu|cuda] [--quantize 4|8|int4-g128] [--host 127.0.0.1]
                          [--port 8000] [--config PATH] [--log-level info]
                          [--api-key KEY ...] [--api-key-file PATH] [--cors-origin ORIGIN ...]
                          [--max-running N] [--max-waiting M] [--shutdown-grace SECONDS]
                          [--ray [--ray-address ADDRESS] [--replicas N]]
                          [--speculative ngram|off] [--num-speculative-tokens K]
    chatglm-gateway chat [--base-url URL | --checkpoint PATH] ...   (see ``chat --help``)

Flags override the environment (``CHATGLM_GATEWAY_*``), which overrides the config file.  With
no model configured anywhere, a tiny random demo model is served so the gateway can be tried
without a download.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway import request_ids, terminal
from gateway.settings import ModelEntry, ServerSettings, SpeculativeSettings, load_settings

logger = logging.getLogger("gateway.cli")

DEMO_MODEL_ID = "chatglm2-demo"
CACHE_ENV = "CHATGLM_GATEWAY_CACHE"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def model_spec(text: str) -> tuple[str, str]:
    """``ID=PATH`` -> ``(id, path)``."""
    model_id, sep, path = text.partition("=")
    if not sep or not model_id or not path:
        raise argparse.ArgumentTypeError(f"expected ID=PATH, got '{text}'")
    return model_id, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatglm-gateway",
        description="An OpenAI-compatible chat completion gateway for ChatGLM models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models over HTTP")
    serve.add_argument("--model", action="append", type=model_spec, default=[],
                       metavar="ID=PATH",
                       help="serve the checkpoint folder PATH as model ID (repeatable); "
                       "replaces the models of the config file")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="compute dtype for every model (default: auto)")
    serve.add_argument("--device", help="cpu, cuda or cuda:N for every model (default: auto)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--config", type=Path, metavar="PATH",
                       help="a TOML or YAML settings file")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                       help="log level (default info)")
    serve.add_argument("--quantize", choices=["4", "8", "int4-g128"],
                       help="weight-only quantization on load for every model")
    serve.add_argument("--int8-activations", action="store_true", default=None,
                       help="for every model: quantise the activations of prefill chunks and "
                       "large decode batches to int8 (AVX512-VNNI; faster prefill, not exact)")
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="accept this bearer key (repeatable; replaces "
                       "CHATGLM_GATEWAY_API_KEYS and the config file's api_keys)")
    serve.add_argument("--api-key-file", type=Path, metavar="PATH",
                       help="accept the keys in this file (one per line, # comments)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow this browser origin (repeatable; CORS is off without one)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                       help="accept this Host header besides loopback names while bound to a "
                       "loopback address (repeatable; DNS-rebinding protection)")
    serve.add_argument("--max-request-bytes", type=int, metavar="BYTES",
                       help="largest request body; larger is a 413 (default 4 MiB)")
    serve.add_argument("--max-running", type=int, metavar="N",
                       help="per model: requests decoded together (default 8)")
    serve.add_argument("--max-waiting", type=int, metavar="M",
                       help="per model: requests queued beyond --max-running before a 429 "
                       "(default 64)")
    serve.add_argument("--kv-cache-memory", type=float, metavar="GIB",
                       help="per model: GiB of KV cache for running requests and prefix reuse "
                       "(default: a quarter of RAM up to 8 GiB on CPU)")
    serve.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                       default=None, help="do not reuse the KV cache of earlier turns")
    serve.add_argument("--speculative", choices=["ngram", "off"],
                       help="per model: speculative decoding; ngram = prompt lookup (drafts "
                       "copied from the prompt and the answer so far, verified in one pass; "
                       "same output, faster on answers that repeat text). Default off")
    serve.add_argument("--num-speculative-tokens", type=int, metavar="K",
                       help="with --speculative ngram: draft ids verified per step (default 4)")
    serve.add_argument("--prompt-lookup-max", type=int, metavar="N",
                       help="with --speculative ngram: longest n-gram looked up (default 4)")
    serve.add_argument("--prompt-lookup-min", type=int, metavar="N",
                       help="with --speculative ngram: shortest n-gram looked up (default 2)")
    serve.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, how long running requests may take to finish "
                       "(default 30)")
    serve.add_argument("--ray", action="store_true", default=None,
                       help="run each model in Ray Serve replicas (pip install "
                       "'chatglm-gateway[ray]'); this process still serves the HTTP API")
    serve.add_argument("--ray-address", metavar="ADDRESS",
                       help="with --ray: join this Ray cluster ('auto', 'HEAD_IP:6379'); "
                       "default: start a local one, stopped with the server")
    serve.add_argument("--replicas", type=int, metavar="N",
                       help="with --ray: replicas per model (default 1)")
    chat = commands.add_parser("chat", help="chat in the terminal (with a running gateway or "
                               "a local checkpoint)")
    terminal.add_chat_arguments(chat)
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Merge flags over environment and config file (flags win)."""
    overrides: dict[str, Any] = {
        key: value for key, value in (
            ("host", args.host), ("port", args.port), ("log_level", args.log_level),
            ("api_key_file", args.api_key_file), ("max_running", args.max_running),
            ("max_waiting", args.max_waiting), ("shutdown_grace", args.shutdown_grace),
            ("kv_cache_memory", args.kv_cache_memory), ("prefix_cache", args.prefix_cache),
            ("max_request_bytes", args.max_request_bytes), ("ray", args.ray),
            ("ray_address", args.ray_address), ("replicas", args.replicas),
        ) if value is not None
    }
    for key, values in (("api_keys", args.api_key), ("cors_origins", args.cors_origin),
                        ("allowed_hosts", args.allowed_host)):
        if values:
            overrides[key] = tuple(values)
    if args.model:
        overrides["models"] = [ModelEntry(id=i, path=Path(p)) for i, p in args.model]
    settings = load_settings(args.config, **overrides)
    entry_overrides = {k: v for k, v in (("dtype", args.dtype), ("device", args.device),
                                         ("quantize", args.quantize),
                                         ("int8_activations", args.int8_activations))
                       if v is not None}
    if entry_overrides:
        models = tuple(
            ModelEntry.model_validate({**m.model_dump(), **entry_overrides})
            for m in settings.models
        )
        settings = settings.model_copy(update={"models": models})
    return with_speculative_flags(settings, args)


def with_speculative_flags(settings: ServerSettings, args: argparse.Namespace) -> ServerSettings:
    """The ``--speculative*`` flags, over each model's own speculative settings (a model that
    sets its own keeps the values the flags leave out) and the server's."""
    flags = {key: value for key, value in (
        ("method", args.speculative), ("num_speculative_tokens", args.num_speculative_tokens),
        ("prompt_lookup_max", args.prompt_lookup_max),
        ("prompt_lookup_min", args.prompt_lookup_min)) if value is not None}
    if not flags:
        return settings

    def merged(own: SpeculativeSettings | None) -> SpeculativeSettings:
        base = own or settings.speculative or SpeculativeSettings()
        return SpeculativeSettings.model_validate({**base.model_dump(), **flags})

    models = tuple(m.model_copy(update={"speculative": merged(m.speculative)})
                   for m in settings.models)
    return settings.model_copy(update={"speculative": merged(None), "models": models})


def with_demo_model(
    settings: ServerSettings, environ: Mapping[str, str], dtype: str | None = None,
    device: str | None = None,
) -> ServerSettings:
    """No model configured -> serve the tiny random demo checkpoint (built once, cached)."""
    if settings.models:
        return settings
    from adapters.demo import DEMO_DESCRIPTION, ensure_demo_checkpoint  # imports torch: lazily

    cache_dir = Path(environ.get(CACHE_ENV) or Path.home() / ".cache" / "chatglm-gateway")
    path = ensure_demo_checkpoint(cache_dir)
    logger.warning(
        "No model configured: serving '%s', a TINY RANDOMLY INITIALISED DEMO MODEL that "
        "produces meaningless text. To serve a real checkpoint run "
        "`chatglm-gateway serve --model NAME=PATH` (PATH is a ChatGLM checkpoint folder, e.g. "
        "a download of THUDM/chatglm3-6b) or list models in a --config file.",
        DEMO_MODEL_ID,
    )
    entry = ModelEntry(id=DEMO_MODEL_ID, path=path, dtype=dtype or "auto",  # type: ignore[arg-type]
                       device=device or "auto", description=DEMO_DESCRIPTION)
    return settings.model_copy(update={"models": (entry,)})


def serve(settings: ServerSettings) -> int:
    from gateway.app import create_app
    from gateway.serving import run

    logger.info("serving on http://%s:%d", settings.host, settings.port)
    return run(create_app(settings), settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "chat":
        return terminal.run_chat(args)
    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError, FileNotFoundError) as err:
        print(f"chatglm-gateway: invalid settings: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    request_ids.install_log_filter()  # a request's log lines name its X-Request-Id
    settings = with_demo_model(settings, os.environ, args.dtype, args.device)
    return serve(settings)
