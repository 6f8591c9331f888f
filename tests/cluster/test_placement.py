"""A 2-node `ray.cluster_utils.Cluster` with a custom resource standing in for GPUs.

Stage tasks that ask for it land only on the node that has it; the feasibility check refuses stages whose
resources no node has, with one line; an inline scheduled run (a RayCronJob's job) runs on the cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import FakeSubmitter, demo_spec

from cmflow.engine import run_pipeline
from cmflow.engine.ray_runtime import check_feasible
from cmflow.errors import ClusterError
from cmflow.schedule.store import create_schedule, new_schedule
from cmflow.schedule.tick import tick
from cmflow.spec import Resources
from cmflow.storage import Storage
from cmflow.submit import InlineSubmitter
from cmflow.validate import validate_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    # Cluster() records its address in <ray temp dir>/ray_current_cluster and fails if that folder is
    # missing, which it is on a fresh machine where no default-temp-dir Ray has run yet
    Path(get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 1,
            "temp_dir": str(tmp_path_factory.mktemp("ray2")),
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
        },
    )
    gpu_node = cluster.add_node(num_cpus=1, resources={"fake_gpu": 1}, node_ip_address="127.0.0.1")
    if ray.is_initialized():  # the session's local Ray (tests/conftest.py starts it again when next needed)
        ray.shutdown()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield {"address": cluster.address, "gpu_node": gpu_node.node_id, "head_node": cluster.head_node.node_id}
    ray.shutdown()
    cluster.shutdown()


def gpu_spec(root: str, custom: dict[str, float], gpus: float = 0.0) -> dict[str, Any]:
    spec = demo_spec(root, name="placed")
    spec["stages"]["left"]["resources"] = {"cpus": 0.5, "gpus": gpus, "custom": custom}
    return spec


def test_tasks_asking_for_the_fake_gpu_land_on_its_node(two_nodes: dict[str, Any]) -> None:
    import ray

    @ray.remote
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    options = Resources(cpus=0.5, custom={"fake_gpu": 1}).ray_options()
    assert options["resources"] == {"fake_gpu": 1}
    placed = ray.get([where.options(**options).remote() for _ in range(4)], timeout=120)
    assert set(placed) == {two_nodes["gpu_node"]}
    anywhere = ray.get([where.options(num_cpus=1).remote() for _ in range(6)], timeout=120)
    assert set(anywhere) <= {two_nodes["gpu_node"], two_nodes["head_node"]}


def test_the_engine_runs_a_fake_gpu_stage_on_the_cluster(two_nodes: dict[str, Any], tmp_path: Path) -> None:
    spec = validate_spec(gpu_spec(str(tmp_path / "root"), {"fake_gpu": 1}))
    record = run_pipeline(spec, address=two_nodes["address"])
    assert record.status == "succeeded"
    assert record.stages["left"].components and record.stages["total"].status == "done"


@pytest.mark.parametrize(
    ("custom", "gpus", "needle"),
    [
        (
            {"fake_tpu": 1},
            0.0,
            "stage 'left' needs CPU=0.5, fake_tpu=1 per task but no node of the cluster has that",
        ),
        ({"fake_gpu": 2}, 0.0, "lower stages.left.resources or use a larger cluster"),
        ({}, 1.0, "set stages.left.resources.gpus=0 or submit to a cluster with GPUs"),
    ],
)
def test_the_feasibility_check_refuses_what_no_node_has(
    two_nodes: dict[str, Any], tmp_path: Path, custom: dict, gpus: float, needle: str
) -> None:
    import ray

    spec = validate_spec(gpu_spec(str(tmp_path / "root"), custom, gpus))
    with pytest.raises(ClusterError) as info:
        run_pipeline(spec, address=two_nodes["address"])
    assert needle in str(info.value) and "\n" not in str(info.value)
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]
    with pytest.raises(ClusterError, match="no node of the cluster has that"):
        check_feasible(nodes, [("left", spec.stages["left"].resources)])


def test_an_inline_tick_runs_the_due_pipeline_on_the_cluster(
    two_nodes: dict[str, Any], tmp_path: Path
) -> None:
    root = str(tmp_path / "root")
    storage = Storage(root)
    spec = validate_spec(gpu_spec(root, {"fake_gpu": 1})).model_dump(mode="json")
    created = datetime(2026, 3, 2, 0, 30, tzinfo=timezone.utc)
    create_schedule(storage, new_schedule(spec, now=created, cron="0 * * * *", schedule_id="inline"))
    now = datetime(2026, 3, 2, 1, 5, tzinfo=timezone.utc)
    fires = tick(now, storage, InlineSubmitter(address=two_nodes["address"]))
    assert [f.outcome for f in fires] == ["submitted"]
    record = storage.read_json(f"runs/{fires[0].run_id}/run.json")
    assert record["status"] == "succeeded"
    assert tick(now, storage, FakeSubmitter()) == []  # claimed: a second tick (any driver) does not re-run it
