"""docker-compose.yml and the Dockerfile agree with the command line they drive.

(No Docker engine runs on the CI machines, so the image itself is not built here; these checks
catch a compose file or entrypoint that the gateway's CLI would reject.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gateway import cli

REPO = Path(__file__).resolve().parent.parent


def _entrypoint() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    match = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert match, "Dockerfile has no exec-form ENTRYPOINT"
    return list(json.loads(match.group(1)))


def test_every_compose_service_is_a_valid_serve_command() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    entry = _entrypoint()
    assert entry[:2] == ["chatglm-gateway", "serve"]
    services = compose["services"]
    assert {"gateway", "gateway-gpu"} <= set(services)
    for name, service in services.items():
        args = cli.build_parser().parse_args(entry[1:] + service["command"])
        assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000, name
        assert str(args.config) == "/config.toml", name
        assert any(v.startswith("./config.toml:/config.toml") for v in service["volumes"]), name
        assert any(v.endswith(":/models:ro") for v in service["volumes"]), name
        assert "/ready" in " ".join(service["healthcheck"]["test"]), name
        assert "CHATGLM_GATEWAY_API_KEYS" in service["environment"], name
    assert services["gateway"].get("profiles") is None  # the CPU service runs by default
    assert services["gateway-gpu"]["profiles"] == ["gpu"]
    assert "--device" in services["gateway-gpu"]["command"]


def test_dockerfile_pins_torch_before_the_package() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert text.index('pip install --no-cache-dir "${TORCH_SPEC}"') < text.index(
        "pip install --no-cache-dir .")
    assert "ARG TORCH_SPEC=torch==" in text


# --------------------------------------------------------------------------- Ray (deploy/)


def _serve_apps(config: dict) -> list[dict]:
    """The applications of a Ray Serve config, checked by Ray's own schema, each built."""
    from ray.serve.schema import ServeDeploySchema

    from adapters.distributed.app import build

    ServeDeploySchema.model_validate(config)
    assert config["proxy_location"] == "Disabled"  # the gateway is the only HTTP door
    for app in config["applications"]:
        assert app["import_path"] == "adapters.distributed.app:build"
        assert app["args"]["id"] == app["name"]  # the gateway finds the app by the model id
        built = build(app["args"])
        assert type(built).__name__ == "Application"
    return list(config["applications"])


def test_ray_serve_config_builds_its_applications() -> None:
    assert _serve_apps(yaml.safe_load((REPO / "deploy" / "ray-serve.yaml").read_text()))


def test_kuberay_rayservice_and_gateway_agree() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(
        (REPO / "deploy" / "kuberay-rayservice.yaml").read_text())}
    service = docs["RayService"]
    apps = _serve_apps(yaml.safe_load(service["spec"]["serveConfigV2"]))
    gateway = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    # the gateway joins the RayService's cluster through KubeRay's head service
    assert f"{service['metadata']['name']}-head-svc:6379" in " ".join(gateway["command"])
    args = cli.build_parser().parse_args(["serve", *gateway["args"]])
    assert args.ray and args.ray_address == "auto" and args.host == "0.0.0.0"
    import tomllib  # Python 3.11+, like the CI

    config = tomllib.loads(docs["ConfigMap"]["data"]["gateway.toml"])
    assert [m["id"] for m in config["models"]] == [a["name"] for a in apps]
    assert str(args.config) == "/config/gateway.toml"


def test_ray_compose_runs_a_head_a_worker_and_the_gateway() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.ray.yml").read_text())
    services = compose["services"]
    assert {"ray-head", "ray-worker", "gateway"} <= set(services)
    assert "--head" in services["ray-head"]["entrypoint"]
    assert "ray-head:6379" in services["ray-worker"]["entrypoint"]
    for service in services.values():
        assert service["build"]["args"]["EXTRAS"] == "ray"
    args = cli.build_parser().parse_args(["serve", *services["gateway"]["command"]])
    assert args.ray and args.ray_address == "auto" and args.port == 8000
    assert "/ready" in " ".join(services["gateway"]["healthcheck"]["test"])
    assert 'ARG EXTRAS=""' in (REPO / "Dockerfile").read_text()
