"""The evaluate stage inside a real pipeline run: pipelines/tiny.yaml plus an evaluate stage, on local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmflow.engine.driver import load_output, run_pipeline, storage_for
from cmflow.spec import apply_overrides, read_yaml
from cmflow.stage import Artifact
from cmflow.validate import validate_spec

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "tiny.yaml"
EVALUATE = {
    "kind": "evaluate",
    "inputs": {"data": "data", "model": "distill", "teacher_samples": "teacher_samples"},
    "params": {"num_samples": 32, "seeds": [0, 1], "kid_subsets": 2, "grid_size": 4},
    "resources": {"cpus": 1},
}


@pytest.mark.slow  # trains the tiny teacher and distils it on Ray Train first (~1 min on 2 shared cores)
def test_evaluate_in_the_tiny_pipeline(ray_session: None, tmp_path: Path) -> None:
    raw = apply_overrides(read_yaml(TINY), [f"storage.root={tmp_path / 'store'}", "tracking.enabled=false"])
    raw["stages"]["evaluate"] = EVALUATE
    spec = validate_spec(raw)
    first = run_pipeline(spec)
    assert first.status == "succeeded", first.error
    assert first.stages["evaluate"].status == "done"
    report = Artifact(storage_for(spec), load_output(spec, first, "evaluate"))
    assert {
        "report.json",
        "fid_vs_nfe.png",
        "grid-teacher.png",
        "grid-cm-1step.png",
        "grid-cm-2step.png",
    } <= set(report.files)
    meta = report.meta
    assert (
        meta["fid_teacher"] > 0 and meta["fid_1step"] > 0 and meta["nfe_teacher"] == 11
    )  # teacher_sample: 6 steps
    distill = Artifact(storage_for(spec), load_output(spec, first, "distill"))
    assert meta["midpoint_sigma"] == distill.read_json("model.json")["sampling"]["two_step_sigmas"][1]
    assert report.read_json("report.json")["settings"]["teacher"]["source"] == "teacher_samples"

    again = run_pipeline(spec)
    assert again.stages["evaluate"].status == "hit"
    bigger_batch = apply_overrides(
        raw, ["stages.evaluate.params.batch_size=7"]
    )  # cache-ignored: same results
    assert run_pipeline(validate_spec(bigger_batch)).stages["evaluate"].status == "hit"
