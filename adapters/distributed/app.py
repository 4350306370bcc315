"""The Ray Serve application of one model, for the gateway and for ``serve deploy``.

:func:`application` is what ``serve --ray`` deploys per model; :func:`build` makes the same
application from a Ray Serve config file's ``args`` (``deploy/ray-serve.yaml``)::

    applications:
      - name: chatglm3-6b                 # the model id: the gateway finds the app by it
        import_path: adapters.distributed.app:build
        args: {id: chatglm3-6b, path: /models/chatglm3-6b, dtype: bfloat16, replicas: 2}

``args`` takes a model entry's keys of the gateway's config file: the scale keys (``replicas``,
``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ``num_cpus``, ``num_gpus``,
``resources``, ``affinity``) and ``load_chat_model``'s keywords (``family``, ``dtype``, ``device``,
``quantize``, ``system_policy``, ``max_running``, ``max_waiting``, ``kv_cache_bytes``,
``prefix_cache``, ``prefill_chunk``, ``description``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from adapters.distributed.replica import ModelReplica
from adapters.distributed.replicas import ScaleOptions
from adapters.distributed.router import AffinityRouter

#: requests a replica takes beyond its engine's capacity: ``prepare`` calls in flight
PREPARE_SLOTS = 8
_SCALE_KEYS = {f.name for f in dataclasses.fields(ScaleOptions)}


def capacity_of(load: Mapping[str, Any]) -> int:
    """Generations one replica holds: its engine's running + waiting."""
    return int(load.get("max_running") or 8) + int(load.get("max_waiting") or 64)


def application(model_id: str, path: str, load: Mapping[str, Any],
                scale: ScaleOptions) -> Application:
    """One deployment of :class:`ModelReplica` loading ``path`` with ``load`` (the keyword
    arguments of ``load_chat_model``), spread as ``scale`` says."""
    deployment = serve.deployment(ModelReplica).options(  # type: ignore[attr-defined]
        **deployment_options(model_id, scale, capacity_of(load), int(load.get("max_running") or 8)))
    return deployment.bind(model_id, str(path), dict(load))  # type: ignore[no-any-return]


def build(args: Mapping[str, Any]) -> Application:
    """The application from a Ray Serve config's ``args`` (see the module's docstring)."""
    rest = dict(args)
    model_id, path = str(rest.pop("id")), str(rest.pop("path"))
    scale = ScaleOptions(**{k: rest.pop(k) for k in list(rest) if k in _SCALE_KEYS})
    return application(model_id, path, rest, scale)


def deployment_options(model_id: str, scale: ScaleOptions, capacity: int,
                       max_running: int) -> dict[str, Any]:
    """The deployment's options: replicas (or autoscaling), resources, the affinity router."""
    options: dict[str, Any] = {
        "name": model_id,
        "ray_actor_options": {"num_cpus": scale.num_cpus, "num_gpus": scale.num_gpus,
                              "resources": dict(scale.resources)},
        "max_ongoing_requests": capacity + PREPARE_SLOTS,
        # Checked every 2 s: a replica that died is replaced (and /ready updated) quickly.
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": 5.0,
        # A checkpoint that cannot load fails the same way every time: fail the start-up soon.
        "max_constructor_retry_count": 2,
    }
    if scale.affinity:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=AffinityRouter,  # type: ignore[arg-type]
            request_router_kwargs={"max_running": max_running})
    if scale.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": scale.min_replicas if scale.min_replicas is not None else 1,
            "max_replicas": scale.max_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests or max_running,
        }
    else:
        options["num_replicas"] = scale.replicas
    return options
