"""pipelines/tiny.yaml end to end on the real local Ray with its artifacts on the real S3 endpoint (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmflow.engine.driver import load_output, run_pipeline, storage_for
from cmflow.spec import apply_overrides, read_yaml
from cmflow.stage import Artifact
from cmflow.validate import validate_spec

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "tiny.yaml"


def _spec(root: str, options: dict, *overrides: str):
    raw = apply_overrides(read_yaml(TINY), [f"storage.root={root}", "tracking.enabled=false", *overrides])
    raw["storage"]["options"] = options
    return validate_spec(raw)


@pytest.mark.slow
def test_tiny_pipeline_on_s3_commits_caches_and_reruns_only_what_changed(
    ray_session: None, s3_root: tuple[str, dict]
) -> None:
    root, options = s3_root
    spec = _spec(root, options)
    first = run_pipeline(spec)
    assert first.status == "succeeded", first.error
    assert {name: s.status for name, s in first.stages.items()} == dict.fromkeys(spec.stages, "done")

    storage = storage_for(spec)
    distill = Artifact(storage, load_output(spec, first, "distill"))
    assert {
        "model.json",
        "model.safetensors",
        "online.safetensors",
        "metrics.jsonl",
        "samples-1step.png",
        "samples-2step.png",
    } <= set(distill.files)
    config = distill.read_json("model.json")
    assert config["kind"] == "cm" and config["sampling"]["two_step_sigmas"][0] == 80.0
    assert config["teacher_digest"] == first.stages["teacher"].manifest_digest
    assert distill.meta["steps"] == 30 and distill.meta["resumed_from_step"] == 0
    rows = distill.read_bytes("metrics.jsonl").decode().splitlines()
    assert len(rows) == 3 and '"loss"' in rows[0] and "imgs_per_s" not in rows[0]  # no timings in artifacts
    assert first.stages["distill"].timings["imgs_per_s"] > 0  # they live in the run record
    train_runs = storage.list(f"work/distill/{first.stages['distill'].cache_key}")
    assert any(name.startswith("checkpoint") for name in train_runs), train_runs  # Ray Train on S3
    samples = Artifact(storage, load_output(spec, first, "teacher_samples"))
    assert samples.read_json("dataset.json")["num_images"] == 64

    again = run_pipeline(spec)
    assert {s.status for s in again.stages.values()} == {"hit"}

    # a recompute from scratch writes the same bytes, so everything downstream is still a hit
    recomputed = run_pipeline(spec, no_cache=["teacher"])
    assert {name: s.status for name, s in recomputed.stages.items()} == {
        "data": "hit",
        "teacher": "done",
        "teacher_samples": "hit",
        "distill": "hit",
    }
    assert recomputed.stages["teacher"].cache_key != first.stages["teacher"].cache_key  # really recomputed
    assert recomputed.stages["teacher"].manifest_digest == first.stages["teacher"].manifest_digest

    changed = run_pipeline(_spec(root, options, "stages.distill.params.lr=3.0e-4"))
    assert {name: s.status for name, s in changed.stages.items()} == {
        "data": "hit",
        "teacher": "hit",
        "teacher_samples": "hit",
        "distill": "done",
    }
