"""The default digits pipeline, end to end, timed, with FIDs (a benchmark: runs only when asked).

    CMFLOW_DIGITS_BENCHMARK=/tmp/digits-bench.json bash .ci/pytest tests/stages/test_digits_benchmark.py -q -s

Runs pipelines/digits.yaml on a local Ray (2 CPUs) with a fresh local store, then scores the teacher (Heun,
NFE 35) and the distilled model at 1 and 2 steps with the shipped digits FID network (5000 samples against
all 1797 images), and writes the timings and FIDs to the JSON file named by the variable.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cmflow.engine.driver import load_output, run_pipeline, storage_for
from cmflow.spec import apply_overrides, read_yaml
from cmflow.stage import Artifact
from cmflow.validate import validate_spec

DIGITS = Path(__file__).resolve().parents[2] / "pipelines" / "digits.yaml"
OUT = os.environ.get("CMFLOW_DIGITS_BENCHMARK")


@pytest.mark.slow
@pytest.mark.skipif(not OUT, reason="set CMFLOW_DIGITS_BENCHMARK=<result.json> to run the digits benchmark")
def test_digits_pipeline_benchmark(tmp_path: Path) -> None:
    import torch

    from cmflow.data.sources import read_sklearn_digits
    from cmflow.diffusion.generate import sample_range
    from cmflow.metrics.extractors import compute_stats, load_extractor
    from cmflow.metrics.stats import fid_from_stats
    from cmflow.models.io import load_model

    overrides = [f"storage.root={tmp_path / 'store'}", *os.environ.get("CMFLOW_DIGITS_SET", "").split()]
    spec = validate_spec(apply_overrides(read_yaml(DIGITS), overrides))
    started = time.time()
    record = run_pipeline(spec)
    wall_s = time.time() - started
    assert record.status == "succeeded", record.error
    storage = storage_for(spec)
    torch.set_num_threads(2)

    def model(stage: str):
        art = Artifact(storage, load_output(spec, record, stage))
        return load_model(art.read_bytes("model.safetensors"), art.read_json("model.json")), art

    extractor = load_extractor("digits")
    reference = compute_stats(extractor, read_sklearn_digits()[0]).to_moments()

    def fid(net, method: str, **kwargs) -> float:
        images, _ = sample_range(net, 10_000_000, 5000, 500, shape=(1, 8, 8), method=method, **kwargs)
        return fid_from_stats(*reference, *compute_stats(extractor, images).to_moments())

    teacher, _ = model("teacher")
    student, art = model("distill")
    eval_started = time.time()
    result = {
        "wall_s": round(wall_s, 1),
        "stage_s": {name: s.seconds for name, s in record.stages.items()},
        "distill_meta": art.meta,
        "fid_teacher_nfe35": fid(teacher, "edm", num_steps=18),
        "fid_1step": fid(student, "cm", sigmas=[80.0]),
    }
    tau = art.read_json("model.json")["sampling"]["two_step_sigmas"][1]
    result["fid_2step"] = {
        str(t): fid(student, "cm", sigmas=[80.0, t]) for t in sorted({0.5, 0.6, 0.7, tau, 1.0})
    }
    result["eval_s"] = round(time.time() - eval_started, 1)
    result["ratio_1step"] = result["fid_1step"] / result["fid_teacher_nfe35"]
    result["ratio_2step"] = min(result["fid_2step"].values()) / result["fid_teacher_nfe35"]
    result["load_avg"] = os.getloadavg()
    Path(OUT).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
