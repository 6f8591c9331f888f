"""The CIFAR-10 rehearsal: the paper-scale graph (pipelines/cifar10-cd.yaml) with small values, for real.

One test checks that the rehearsal is that graph -- the same stages, kinds, inputs and parameter names --
differing only in values; the other runs a shortened rehearsal end to end on this machine: the real
CIFAR-10 python-tarball loader through Ray Data, teacher and distillation on 2 Ray Train workers each
streaming shards from the S3 endpoint, the Inception-v3 evaluation over 2 Ray tasks, registration and
promotion in a real MLflow server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rehearsal_inputs import write_inputs

from cmflow.spec import apply_overrides, read_yaml
from cmflow.validate import validate_spec

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def test_the_rehearsal_is_the_cifar10_graph_with_other_values() -> None:
    full, rehearsal = (
        read_yaml(PIPELINES / "cifar10-cd.yaml"),
        read_yaml(PIPELINES / "cifar10-rehearsal.yaml"),
    )
    assert set(full) == set(rehearsal)
    assert list(full["stages"]) == list(rehearsal["stages"])
    for name, stage in full["stages"].items():
        other = rehearsal["stages"][name]
        assert set(stage) == set(other), name
        assert stage["kind"] == other["kind"] and stage.get("inputs") == other.get("inputs"), name
        assert set(stage.get("params", {})) == set(other.get("params", {})), name
        assert set(stage.get("resources", {})) <= set(other.get("resources", {})) | {"gpus", "memory_gb"}, (
            name
        )
    for spec in (full, rehearsal):
        validate_spec(spec)
    teacher = rehearsal["stages"]["teacher"]["resources"]
    assert teacher["workers"] == rehearsal["stages"]["distill"]["resources"]["workers"] == 2
    assert rehearsal["stages"]["evaluate"]["params"]["num_tasks"] == 2
    assert rehearsal["storage"]["root"].startswith("s3://")


@pytest.mark.slow
def test_a_shortened_rehearsal_runs_end_to_end(
    ray_session: None, s3_root: tuple[str, dict], mlflow_server: str, tmp_path: Path
) -> None:
    from cmflow.engine.driver import load_output, run_pipeline, storage_for
    from cmflow.stage import Artifact

    root, options = s3_root
    inputs = write_inputs(f"{root}/inputs", per_batch=40, options=options)
    raw = apply_overrides(
        read_yaml(PIPELINES / "cifar10-rehearsal.yaml"),
        [
            f"storage.root={root}/artifacts",
            f"tracking.uri={mlflow_server}",
            f"stages.data.params.uri={inputs['tarball']}",
            f"stages.evaluate.params.weights_uri={inputs['inception']}",
            "stages.teacher.params.steps=8",
            "stages.teacher.params.checkpoint_every=4",
            "stages.teacher.params.grid_samples=4",
            "stages.distill.params.steps=8",
            "stages.distill.params.checkpoint_every=4",
            "stages.distill.params.grid_samples=4",
            "stages.evaluate.params.num_samples=16",
            "stages.evaluate.params.batch_size=8",
            "stages.evaluate.params.feature_batch_size=8",
            "stages.evaluate.params.reference_images=32",
            "stages.evaluate.params.teacher_steps=2",
            "stages.evaluate.params.kid_subsets=2",
            "stages.evaluate.params.grid_size=2",
        ],
    )
    raw["storage"]["options"] = options
    spec = validate_spec(raw)
    record = run_pipeline(spec)
    assert record.status == "succeeded", record.error
    assert {name: s.status for name, s in record.stages.items()} == dict.fromkeys(spec.stages, "done")
    storage = storage_for(spec)
    data = Artifact(storage, load_output(spec, record, "data")).read_json("dataset.json")
    assert data["num_images"] == 400 and data["channels"] == 3 and data["resolution"] == 32  # 200 + flips
    for stage in ("teacher", "distill"):
        assert storage.list(f"work/{stage}/{record.stages[stage].cache_key}")  # Ray Train ran on S3
        assert record.stages[stage].meta["steps"] == 8 and record.stages[stage].timings["imgs_per_s"] > 0
    report = Artifact(storage, load_output(spec, record, "evaluate")).read_json("report.json")
    assert report["extractor"]["name"] == "inception-v3" and report["reference"]["num_images"] == 32
    assert record.stages["promote"].meta["outcome"] in {"promoted", "kept", "rejected"}
