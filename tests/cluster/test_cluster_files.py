"""Every file in cluster/ parses and says what the cluster needs (GPU groups, pinned Ray, tick CronJob)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_VERSION = "2.60.0"


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc is not None]


def images(node: Any) -> list[str]:
    """Every `image:` value anywhere in a manifest."""
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["template"]["spec"]["containers"]


def test_every_file_in_cluster_is_checked_here() -> None:
    checked = {
        "Dockerfile",
        "README.md",
        "aws-gpu.yaml",
        "local-two-node.sh",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/cronjob-tick.yaml",
        "kuberay/secrets.example.yaml",
        "kuberay/raycronjob.yaml.tmpl",
    }
    present = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    assert present == checked, "add a check for each new file in cluster/"


@pytest.mark.parametrize("path", sorted(p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*.yaml")))
def test_yaml_parses_and_images_are_pinned_to_ray_2_60(path: str) -> None:
    docs = load(path)
    assert docs
    for image in images(docs):
        assert RAY_VERSION in image, f"{path}: image {image} is not pinned to Ray {RAY_VERSION}"
    text = (CLUSTER / path).read_text()
    assert ":latest" not in text and "nightly" not in text


def test_dockerfile_builds_on_the_pinned_ray_gpu_image() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert "pip install" in text and "ray.__version__ == '2.60.0'" in text


def test_launcher_config_has_gpu_worker_types_token_auth_and_the_scheduler() -> None:
    [config] = load("aws-gpu.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert len(gpu_types) >= 2 and all(t["max_workers"] >= 1 for t in gpu_types.values())
    assert all(
        t["node_config"]["InstanceType"].startswith(("g5", "p4d", "p5", "g6")) for t in gpu_types.values()
    )
    assert config["max_workers"] >= sum(t["min_workers"] for t in gpu_types.values())
    assert RAY_VERSION in config["docker"]["image"]
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "ray start --head" in head
    assert "cmflow scheduler start" in head and "--dashboard-host=0.0.0.0" in head
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"])
    assert "ray stop" not in head + " ".join(config["worker_start_ray_commands"])


def test_raycluster_has_head_and_gpu_worker_groups_with_gpu_limits() -> None:
    [cluster] = load("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token", "secretName": "cmflow-ray-token"}
    head = containers(spec["headGroupSpec"])[0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    [worker] = containers(gpu)
    assert (
        worker["resources"]["limits"]["nvidia.com/gpu"]
        == worker["resources"]["requests"]["nvidia.com/gpu"]
        == "1"
    )
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(groups["cpu"]))


def test_rayjob_runs_the_cmflow_driver_on_the_standing_cluster() -> None:
    [job] = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {
        "ray.io/cluster": load("kuberay/raycluster.yaml")[0]["metadata"]["name"]
    }
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "cmflow.cli.main", "run"]
    assert argv[argv.index("--run-id") + 1] == job["metadata"]["name"] == spec["metadata"]["cmflow_run_id"]
    assert argv[argv.index("--address") + 1] == "auto"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    env = {e["name"] for e in spec["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert "RAY_AUTH_TOKEN" in env


def test_cronjob_ticks_every_schedule_with_concurrency_forbid() -> None:
    [cron] = load("kuberay/cronjob-tick.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["schedule"] == "* * * * *"
    [container] = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:4] == ["cmflow", "schedule", "tick", "--all"]
    assert command[command.index("--root") + 1].startswith("s3://")
    env = {e["name"] for e in container["env"]}
    assert "RAY_AUTH_TOKEN" in env
    assert spec["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_raycronjob_template_takes_the_ray_version_at_render_time() -> None:
    text = (CLUSTER / "kuberay/raycronjob.yaml.tmpl").read_text()
    [template] = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    assert template["kind"] == "RayCronJob"
    assert template["spec"]["jobTemplate"]["rayClusterSpec"]["rayVersion"] == "${ray_version}"
    version = r"(?<![\d.])\d+\.\d+\.\d+(?![\d.])"  # 2.60.0, not the address 0.0.0.0
    assert not re.search(version, text), "the Ray version is filled in from the installed ray"
    assert set(images(template)) == {"${image}"}


def test_secrets_example_defines_what_the_manifests_reference() -> None:
    secrets = {doc["metadata"]["name"]: doc for doc in load("kuberay/secrets.example.yaml")}
    assert set(secrets) == {"cmflow-ray-token", "cmflow-s3"}
    assert "auth_token" in secrets["cmflow-ray-token"]["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secrets["cmflow-s3"]["stringData"])
    referenced = set(
        re.findall(
            r"name: (cmflow-[a-z0-9-]+)\b",
            "".join(
                (CLUSTER / f).read_text()
                for f in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/cronjob-tick.yaml")
            ),
        )
    )
    assert {"cmflow-ray-token", "cmflow-s3"} <= referenced


def test_local_two_node_recipe_is_valid_bash_and_stops_by_pid() -> None:
    script = CLUSTER / "local-two-node.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "ray stop" not in code
    assert "--node-ip-address=127.0.0.1" in code and "--dashboard-host=127.0.0.1" in code
    assert "fake_gpu" in code and 'kill -TERM -- "-$pid"' in code
    result = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_readme_lists_every_file() -> None:
    text = (CLUSTER / "README.md").read_text()
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert f"`{path.relative_to(CLUSTER).as_posix()}`" in text
