"""``--ray-address``: the gateway joins an existing Ray cluster of two nodes and its replicas
run one per node (``ray.cluster_utils.Cluster`` starts both nodes on this machine; a custom
resource that each node offers once and each replica takes once forces the spread, as
``ray start --resources`` would on real machines)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.conftest import chatglm2_tiny_checkpoint
from tests.server import running_server

SLOT = "gateway_slot"  # a custom resource: one per node


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chatglm2_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    nodes = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 1, "resources": {SLOT: 1}, "include_dashboard": False})
    nodes.add_node(num_cpus=1, resources={SLOT: 1})
    nodes.wait_for_nodes()
    try:
        yield nodes
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


def test_replicas_on_two_nodes_both_serve(cluster: Cluster, checkpoint: Path) -> None:
    settings = ServerSettings(
        ray=True, ray_address=cluster.address, replicas=2,
        models=(ModelEntry(id="glm2", path=checkpoint, dtype="float32",
                           num_cpus=0.5, resources={SLOT: 1}),))
    with running_server(create_app(settings), timeout=300, wait_ready=True) as url:
        deadline = time.monotonic() + 30  # /ready needs one replica; both report shortly
        while len(replicas := httpx.get(f"{url}/v1/models/glm2").json()["replicas"]) < 2:
            assert time.monotonic() < deadline, replicas
            time.sleep(0.2)
        nodes = {r["node"] for r in replicas}
        assert nodes == {node["NodeID"] for node in ray.nodes() if node["Alive"]}

        def ask(i: int) -> httpx.Response:
            return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "glm2", "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": f"conversation {i}: hello there"}]})

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert {a.headers["X-Replica"] for a in answers} == {r["id"] for r in replicas}
    # The gateway joined the cluster: it leaves it running (only Serve's app is gone).
    assert ray.is_initialized() and "glm2" not in serve.status().applications


def test_the_gateway_uses_an_application_deployed_before_it(cluster: Cluster,
                                                           checkpoint: Path) -> None:
    """What ``serve deploy deploy/ray-serve.yaml`` does, then a gateway joining: it serves the
    running application and leaves it running when it stops."""
    from adapters.distributed.app import build

    serve.run(build({"id": "glm2", "path": str(checkpoint), "dtype": "float32", "replicas": 1,
                     "num_cpus": 0.5}), name="glm2", route_prefix=None)
    settings = ServerSettings(ray=True, ray_address=cluster.address, models=(
        ModelEntry(id="glm2", path=checkpoint, dtype="float32", replicas=2),))
    with running_server(create_app(settings), timeout=300, wait_ready=True) as url:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "glm2", "temperature": 0, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200 and r.headers["X-Replica"]
        # the application as deployed (1 replica), not as this gateway would have made it (2)
        assert len(httpx.get(f"{url}/v1/models/glm2").json()["replicas"]) == 1
    assert str(serve.status().applications["glm2"].status).endswith("RUNNING")
    serve.delete("glm2")
