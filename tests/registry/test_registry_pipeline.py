"""pipelines/tiny.yaml + evaluate + register + promote, tracked on a real ``mlflow server``, on real Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import unique

from cmflow import registry
from cmflow.cli.main import main
from cmflow.engine import run_pipeline
from cmflow.mlflow_client import client_for
from cmflow.registry import load_pyfunc
from cmflow.spec import PipelineSpec, apply_overrides, read_yaml
from cmflow.validate import validate_spec

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "tiny.yaml"


def tiny_with_registry(root: str, tracking_uri: str, model_name: str, max_fid: float = 1.0e6) -> PipelineSpec:
    raw: dict[str, Any] = apply_overrides(read_yaml(TINY), [f"storage.root={root}"])
    raw["name"] = f"tiny-reg-{model_name}"
    raw["tracking"] = {"enabled": True, "uri": tracking_uri}
    raw["stages"].update(
        {
            "evaluate": {
                "kind": "evaluate",
                "inputs": {"data": "data", "model": "distill"},
                "params": {
                    "num_samples": 64,
                    "seeds": [0],
                    "batch_size": 64,
                    "kid_subsets": 2,
                    "kid_subset_size": 32,
                    "pr_max_samples": 64,
                    "grid_size": 4,
                },
            },
            "register": {
                "kind": "register",
                "inputs": {"model": "distill", "report": "evaluate", "data": "data"},
                "params": {"model_name": model_name, "gate": {"max_fid": max_fid, "tolerance": 0.05}},
            },
            "promote": {
                "kind": "promote",
                "inputs": {"registered": "register"},
                "cache": {"enabled": False},
            },
        }
    )
    return validate_spec(raw)


@pytest.mark.slow
@pytest.mark.skipif(not TINY.is_file(), reason="pipelines/tiny.yaml is not there yet")
def test_tiny_pipeline_registers_promotes_and_tracks(
    ray_session: None, tmp_path: Path, mlflow_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique("cm-tiny")
    spec = tiny_with_registry(str(tmp_path / "root"), mlflow_server, name)
    record = run_pipeline(spec)
    assert record.status == "succeeded", record.error
    client = client_for(mlflow_server)

    mv = client.get_model_version_by_alias(name, "champion")  # the first version passes the absolute gate
    assert mv.version == "1" and client.get_model_version_by_alias(name, "challenger").version == "1"
    report = record.stages["evaluate"].meta
    assert float(mv.tags["fid_1step"]) == pytest.approx(report["fid_1step"])
    assert float(mv.tags["fid_2step"]) == pytest.approx(report["fid_2step"])
    assert mv.tags["nfe_1step"] == "1.0" and mv.tags["nfe_2step"] == "2.0"
    assert mv.tags["cmflow.ref_stats_digest"] == report["ref_stats_digest"]
    assert mv.tags["cmflow.dataset_digest"] == record.stages["data"].meta["digest"]
    assert mv.tags["cmflow.run_id"] == record.run_id
    assert mv.tags["cmflow.cache_key"] == record.stages["register"].cache_key
    assert record.stages["promote"].meta["outcome"] == "promoted"

    parent = client.get_run(record.tracking["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=50
    )
    by_stage = {run.data.tags["cmflow.stage"]: run for run in children}
    assert set(by_stage) == set(spec.stages)
    assert mv.tags["cmflow.stage_run_id"] == by_stage["register"].info.run_id  # logged in its child run
    distill = by_stage["distill"].info.run_id
    assert [m.step for m in client.get_metric_history(distill, "loss")] == [10, 20, 30]
    assert "images/samples-1step.png" in [a.path for a in client.list_artifacts(distill, "images")]
    evaluate = [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "images")]
    assert "images/fid_vs_nfe.png" in evaluate

    images = load_pyfunc(f"models:/{name}@champion", mlflow_server).predict({"num_samples": 2, "steps": 2})
    assert images.shape == (2, 1, 8, 8)

    again = run_pipeline(spec)  # everything is a hit except promote (cache disabled): nothing changes
    assert {n: s.status for n, s in again.stages.items() if s.status != "hit"} == {"promote": "done"}
    promote_run = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{again.tracking['parent_run_id']}' and tags.`cmflow.stage` = 'promote'",
    )[0]
    assert promote_run.data.tags["cmflow.promotion.outcome"] == "noop"  # this run's decision
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert len(registry.versions(client, name)) == 1

    # a stricter gate: the same model registers as v2 under max_fid 0.001 and the gate rejects it
    strict = run_pipeline(tiny_with_registry(str(tmp_path / "root"), mlflow_server, name, max_fid=1e-3))
    assert strict.status == "succeeded", strict.error
    assert {n for n, s in strict.stages.items() if s.status != "hit"} == {"register", "promote"}
    promoted = strict.stages["promote"].meta
    assert (promoted["version"], promoted["outcome"]) == ("2", "rejected")
    assert f"fid_1step {report['fid_1step']:.4g} > max_fid 0.001" in promoted["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    v2 = client.get_model_version(name, "2")
    assert v2.tags["cmflow.validation_status"] == "failed"
    assert json.loads(v2.tags["cmflow.gate"])["max_fid"] == 1e-3
    capsys.readouterr()  # drop what came before (MLflow's download progress bars)
    assert main(["models", "promote", name, "--version", "2", "--tracking-uri", mlflow_server]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "> max_fid 0.001" in err and '--force --reason "..."' in err
    assert client.get_model_version_by_alias(name, "champion").version == "1"
