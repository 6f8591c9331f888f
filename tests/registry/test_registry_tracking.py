"""MLflow tracking through the real engine: nested stage runs, cache hits, credentials kept out."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import unique

from cmflow.engine import RunRecord, run_pipeline, storage_for
from cmflow.errors import SpecError
from cmflow.mlflow_client import client_for
from cmflow.spec import PipelineSpec
from cmflow.validate import validate_spec

pytestmark = pytest.mark.usefixtures("ray_session")


def demo_spec(root: str, *, options: dict[str, Any] | None = None, **tracking: Any) -> PipelineSpec:
    return validate_spec(
        {
            "name": unique("track"),
            "storage": {"root": root, "options": options or {}},
            "tracking": tracking,
            "stages": {
                "left": {"kind": "demo.arrays", "params": {"n": 8, "seed": 1}},
                "right": {"kind": "demo.arrays", "params": {"n": 8, "seed": 2}},
                "total": {
                    "kind": "demo.reduce",
                    "inputs": {"a": "left", "b": "right"},
                    "params": {"scale": 2.0},
                },
            },
        }
    )


def runs_of(client: Any, record: RunRecord) -> tuple[Any, dict[str, Any]]:
    """The parent run of a pipeline run and its child runs by stage name."""
    parent = client.get_run(record.tracking["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=100
    )
    by_stage = {run.data.tags["cmflow.stage"]: run for run in children}
    assert len(by_stage) == len(children), "one child run per stage"
    return parent, by_stage


def test_nested_runs_per_stage_and_cache_hits_on_rerun(tmp_path: Path, mlflow_server: str) -> None:
    spec = demo_spec(str(tmp_path / "root"), uri=mlflow_server)
    client = client_for(mlflow_server)
    first = run_pipeline(spec)
    assert first.status == "succeeded", first.error
    parent, children = runs_of(client, first)
    assert parent.info.status == "FINISHED" and parent.info.run_name == first.run_id
    assert (
        parent.data.tags["cmflow.run_id"] == first.run_id and parent.data.tags["cmflow.status"] == "succeeded"
    )
    assert parent.data.params["stages.total.params.scale"] == "2.0"
    assert parent.data.metrics["stages_done"] == 3.0
    assert set(children) == {"left", "right", "total"}
    for stage, run in children.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED" and run.info.run_name == stage
        assert tags["cmflow.cache_hit"] == "false"
        assert tags["cmflow.cache_key"] == first.stages[stage].cache_key
        assert tags["cmflow.manifest_uri"] == first.stages[stage].manifest_uri
        assert tags.get("ray.task_id") and tags.get("ray.node_id")
    left = children["left"]
    assert left.data.params["n"] == "8" and left.data.params["seed"] == "1"
    history = client.get_metric_history(left.info.run_id, "mean")  # ctx.log_metrics(0, mean=...)
    assert [m.step for m in history] == [0]
    assert children["total"].data.metrics["sum"] == pytest.approx(first.stages["total"].meta["sum"])
    assert "cmflow/manifest.json" in [a.path for a in client.list_artifacts(left.info.run_id, "cmflow")]

    again = run_pipeline(spec)
    assert [s.status for s in again.stages.values()] == ["hit"] * 3
    parent2, hits = runs_of(client, again)
    assert parent2.info.run_id != parent.info.run_id and parent2.data.metrics["stages_hit"] == 3.0
    for stage, run in hits.items():
        assert run.data.tags["cmflow.cache_hit"] == "true"
        assert run.data.tags["cmflow.source_run_id"] == children[stage].info.run_id
        assert run.data.tags["cmflow.manifest_uri"] == first.stages[stage].manifest_uri

    resumed = run_pipeline(spec, run_id=again.run_id)  # resume: the same parent run, reopened
    assert resumed.tracking["parent_run_id"] == parent2.info.run_id
    parent3, _ = runs_of(client, resumed)  # still one child per stage (no second hit run)
    assert parent3.info.status == "FINISHED" and parent3.data.tags["cmflow.attempt"] == "2"


def test_credentials_never_reach_mlflow(s3_root: tuple[str, dict[str, str]], mlflow_server: str) -> None:
    root, options = s3_root
    secret, password = "sUpErSeCrEt", "pAsSwOrD42"
    uri = mlflow_server.replace("http://", f"http://cmflow:{password}@")
    spec = demo_spec(root, options={**options, "key": "testing", "secret": secret}, uri=uri)
    record = run_pipeline(spec)
    assert record.status == "succeeded", record.error
    client = client_for(mlflow_server)
    parent, children = runs_of(client, record)
    assert parent.data.params["storage.options.secret"] == "***"
    assert password not in json.dumps(record.tracking) and "***" in record.tracking["uri"]
    for run in [parent, *children.values()]:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert secret not in text and password not in text
    run_json = Path(client.download_artifacts(parent.info.run_id, "cmflow/run.json"))
    assert secret not in run_json.read_text() and password not in run_json.read_text()
    assert password not in storage_for(spec).read_bytes(f"runs/{record.run_id}/run.json").decode()


def test_default_store_is_sqlite_under_a_local_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    record = run_pipeline(demo_spec(str(root)))
    assert record.status == "succeeded", record.error
    assert (root / "mlflow.db").is_file()
    with sqlite3.connect(root / "mlflow.db") as db:
        names = {row[0] for row in db.execute("select name from runs")}
        (location,) = db.execute(
            "select artifact_location from experiments where name = ?", (record.pipeline,)
        )
    assert {record.run_id, "left", "right", "total"} <= names
    assert location[0] == (root / "mlflow-artifacts").as_uri()  # not ./mlruns in the cwd


def test_s3_root_without_a_tracking_server_is_refused(s3_root: tuple[str, dict[str, str]]) -> None:
    root, options = s3_root
    spec = demo_spec(root, options=options)
    with pytest.raises(SpecError, match="tracking.uri"):
        run_pipeline(spec)
    (run_id,) = storage_for(spec).list("runs")
    assert RunRecord.load(storage_for(spec), run_id).status == "failed"


def test_stage_tracker_logs_png_outputs(tmp_path: Path, mlflow_server: str) -> None:
    """PNG files in a stage's output become image artifacts of its run; numeric meta becomes metrics."""
    from PIL import Image

    from cmflow.engine.tracking import StageTracker
    from cmflow.engine.worker import StageTask
    from cmflow.mlflow_client import experiment_id
    from cmflow.spec import Resources
    from cmflow.stage import StageContext
    from cmflow.storage import Storage

    client = client_for(mlflow_server)
    exp = experiment_id(client, unique("png"))
    parent = client.create_run(exp).info.run_id
    storage = Storage(str(tmp_path / "store"))
    out = tmp_path / "out"
    (out / "grids").mkdir(parents=True)
    Image.new("L", (16, 16), 128).save(out / "grids" / "samples.png")
    task = StageTask(
        "r1",
        "evaluate",
        "evaluate",
        {"n": 1, "lpips_key": "k"},
        "f" * 64,
        {},
        0,
        Resources(),
        storage.root,
        {},
    )
    ctx = StageContext("r1", "evaluate", "evaluate", "f" * 64, 0, out, storage, Resources())
    payload = {"uri": mlflow_server, "experiment_id": exp, "parent_run_id": parent}
    tracker = StageTracker.start(payload, task, ctx)
    assert ctx.tracking["stage_run_id"] == tracker.run_id
    import pickle

    assert pickle.loads(pickle.dumps(ctx.reporter)) is None  # shipped to Ray Train workers: the inner one
    ctx.log_metrics(1, loss=0.5)
    ctx.log_metrics(2, loss=0.25)
    manifest = storage.commit("evaluate", "f" * 64, out, meta={"fid_1step": 12.0, "nested": {"nfe": 2}})
    tracker.log_outputs(manifest, ctx.metrics)
    tracker.finish("FINISHED")
    tracker.finish("FINISHED")  # idempotent
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["lpips_key"] == "***"  # secret-looking param names are redacted
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [0.5, 0.25]
    assert run.data.metrics["fid_1step"] == 12.0 and run.data.metrics["nested.nfe"] == 2.0
    assert [a.path for a in client.list_artifacts(tracker.run_id, "images/grids")] == [
        "images/grids/samples.png"
    ]
