"""The engine on a real local Ray: concurrency, cache hits, retries of transient errors, resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from cmflow.engine import RunRecord, driver, list_runs, plan, run_pipeline, storage_for
from cmflow.engine.ray_runtime import RayRuntime
from cmflow.errors import ClusterError
from cmflow.spec import PipelineSpec
from cmflow.validate import validate_spec

pytestmark = pytest.mark.usefixtures("ray_session")


def diamond(root: str, options: dict[str, Any] | None = None, **overrides: Any) -> PipelineSpec:
    raw: dict[str, Any] = {
        "name": "diamond",
        "storage": {"root": root, "options": options or {}},
        "tracking": {"enabled": False},
        "stages": {
            "source": {"kind": "demo.arrays", "params": {"n": 8}},
            "left": {"kind": "demo.arrays", "params": {"n": 8, "seed": 1, "sleep_s": 2.5}, "inputs": {}},
            "right": {"kind": "demo.arrays", "params": {"n": 8, "seed": 2, "sleep_s": 2.5}},
            "total": {"kind": "demo.reduce", "inputs": {"a": "left", "b": "right", "c": "source"}},
        },
    }
    for path, value in overrides.items():
        node = raw
        *parents, last = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return validate_spec(raw)


def statuses(record: RunRecord) -> dict[str, str]:
    return {name: s.status for name, s in record.stages.items()}


def test_diamond_branches_overlap_and_rerun_hits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meet = {"rendezvous_dir": str(tmp_path / "meet"), "rendezvous_peers": 2}
    spec = diamond(
        str(tmp_path / "root"),
        stages__left__params={"n": 8, "seed": 1, **meet},
        stages__right__params={"n": 8, "seed": 2, **meet},
    )
    assert {r.decision for r in plan(spec)} == {"run", "run (upstream runs)"}
    # left and right each wait until the other has started: run one after the other, they would time out
    record = run_pipeline(spec)
    assert record.status == "succeeded", record.error
    left, right = record.stages["left"], record.stages["right"]
    assert sorted((tmp_path / "meet").iterdir()) == [tmp_path / "meet" / "left", tmp_path / "meet" / "right"]
    expected = left.meta["sum"] + right.meta["sum"] + record.stages["source"].meta["sum"]
    assert record.stages["total"].meta["sum"] == pytest.approx(expected)

    assert [r.decision for r in plan(spec)] == ["hit"] * 4
    monkeypatch.setattr(RayRuntime, "start", _no_ray)  # from here on, nothing may start or attach Ray
    again = run_pipeline(spec)
    assert statuses(again) == dict.fromkeys(record.stages, "hit")
    assert RunRecord.load(storage_for(spec), again.run_id).status == "succeeded"

    # a miss of a kind that needs no compute runs in the driver: still no Ray, and it really ran
    monkeypatch.setattr(driver, "IN_DRIVER", frozenset({"demo.reduce"}))
    scaled = diamond(
        str(tmp_path / "root"),
        stages__left__params={"n": 8, "seed": 1, **meet},
        stages__right__params={"n": 8, "seed": 2, **meet},
        stages__total__params={"scale": 2.0},
    )
    here = run_pipeline(scaled)
    assert statuses(here) == {"source": "hit", "left": "hit", "right": "hit", "total": "done"}, here.error
    assert here.stages["total"].meta["sum"] == pytest.approx(2 * expected)
    assert here.stages["total"].started_at and here.stages["total"].ended_at


def _no_ray(self: RayRuntime) -> None:
    raise AssertionError("the run started Ray")


def test_no_cache_recompute_with_identical_bytes_keeps_downstream_hits(tmp_path: Path) -> None:
    spec = diamond(str(tmp_path / "root"), stages__left__params={"n": 8, "seed": 1})
    spec = spec.model_copy(update={"stages": {**spec.stages, "right": spec.stages["source"]}})
    run_pipeline(spec)
    record = run_pipeline(spec, no_cache=["source"])
    assert statuses(record) == {"source": "done", "left": "hit", "right": "hit", "total": "hit"}


def test_changed_param_reruns_only_that_stage_and_downstream(tmp_path: Path) -> None:
    spec = diamond(str(tmp_path / "root"), stages__left__params={"n": 8, "seed": 1})
    run_pipeline(spec)
    changed = diamond(str(tmp_path / "root"), stages__left__params={"n": 8, "seed": 7})
    why = {row.stage: row.reason for row in plan(changed)}
    assert why["left"] == "changed since the last run: params.seed 1 → 7"  # which, old → new
    record = run_pipeline(changed)
    assert statuses(record) == {"source": "hit", "left": "done", "right": "hit", "total": "done"}


def test_a_stopped_run_records_how_long_its_stage_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driver, "PROGRESS_SAVE_S", 0.0)  # save the running stage's progress at every poll
    spec = diamond(str(tmp_path / "root"), stages__source__params={"n": 8, "sleep_s": 3.0})

    def stop_after_a_second(record: RunRecord, progress: dict[str, Any]) -> None:
        source = record.stages["source"]
        if source.status == "running" and time.time() - _epoch(source.started_at) > 1.0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(spec, listener=stop_after_a_second)
    stored = next(r for r in list_runs(storage_for(spec)))
    assert stored.status == "stopped"
    assert stored.stages["source"].status == "stopped" and stored.stages["source"].seconds >= 1.0
    assert stored.stages["total"].status == "skipped"
    saved = storage_for(spec).read_json(f"runs/{stored.run_id}/progress.json")  # what `cmflow status` shows
    assert saved["source"]["total"] == 30 and 0 < saved["source"]["done"] <= 30


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_transient_error_is_retried(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    spec = diamond(
        str(tmp_path / "root"),
        stages__source__params={"n": 8, "transient_failures_marker": str(marker)},
        stages__left__params={"n": 8},
        stages__right__params={"n": 8, "seed": 2},
    )
    record = run_pipeline(spec)
    assert marker.exists(), "the first attempt did not run"
    assert record.status == "succeeded" and record.stages["source"].status == "done"


def test_failed_stage_resumes_after_the_fix(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    broken = diamond(
        root,
        stages__left__params={"n": 8, "seed": 1, "fail": True},
        stages__right__params={"n": 8, "seed": 2},
    )
    record = run_pipeline(broken)
    assert record.status == "failed"
    assert statuses(record) == {"source": "done", "left": "failed", "right": "done", "total": "skipped"}
    assert "was told to fail" in record.stages["left"].error and "\n" not in record.stages["left"].error
    stored = RunRecord.load(storage_for(broken), record.run_id)
    assert stored.status == "failed" and stored.stages["left"].status == "failed"

    fixed = diamond(
        root,
        stages__left__params={"n": 8, "seed": 1, "fail": False},
        stages__right__params={"n": 8, "seed": 2},
    )
    resumed = run_pipeline(fixed, run_id=record.run_id)
    assert resumed.run_id == record.run_id and resumed.attempts == 2
    assert statuses(resumed) == {"source": "hit", "left": "done", "right": "hit", "total": "done"}


def test_gpu_stage_on_cpu_cluster_fails_up_front(tmp_path: Path) -> None:
    spec = diamond(str(tmp_path / "root"), stages__left__resources={"gpus": 1})
    with pytest.raises(
        ClusterError, match=r"stage 'left' needs .*GPU=1.* no node .*set stages\.left\.resources\.gpus=0"
    ):
        run_pipeline(spec)
    assert not (tmp_path / "root").exists(), "a refused run wrote to the store"


def test_engine_on_s3(s3_root: tuple[str, dict[str, str]]) -> None:
    root, options = s3_root
    spec = diamond(
        root, options, stages__left__params={"n": 8, "seed": 1}, stages__right__params={"n": 8, "seed": 2}
    )
    assert run_pipeline(spec).status == "succeeded"
    assert set(statuses(run_pipeline(spec)).values()) == {"hit"}
