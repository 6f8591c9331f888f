"""The CLI through Typer's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmflow.cli.main import app, main

REPO = Path(__file__).resolve().parents[2]
SPEC = """
name: clidemo
storage: {root: %s}
tracking: {enabled: false}
stages:
  a: {kind: demo.arrays, params: {n: 4}}
  b: {kind: demo.reduce, inputs: {a: a}}
"""


@pytest.fixture()
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC % (tmp_path / "root"))
    return path


def test_validate_plan_schema(spec_file: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(spec_file)])
    assert result.exit_code == 0 and "ok — pipeline 'clidemo', 2 stages: a -> b" in result.output
    result = runner.invoke(app, ["plan", str(spec_file)])
    assert result.exit_code == 0 and "run" in result.output
    result = runner.invoke(app, ["schema", "--stage", "demo.arrays"])
    assert json.loads(result.output)["properties"]["n"]["default"] == 16


def test_errors_are_one_line_with_exit_codes(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(spec_file), "--set", "stages.a.params.n=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "stages.a.params.n" in err
    assert main(["validate", "/nope.yaml"]) == 2
    assert main(["run", "--bogus"]) == 2
    assert "No such option: --bogus; see `cmflow run --help`" in capsys.readouterr().err
    assert main(["status", "no-such-run", "--root", str(spec_file.parent / "root")]) == 2
    assert main(["schema", "--stage", "nope"]) == 2


@pytest.mark.usefixtures("ray_session")
def test_run_status_explain_and_runs_list(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(spec_file.parent / "root")
    assert main(["run", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out
    assert main(["run", str(spec_file), "--set", "stages.a.params.n=5"]) == 0
    capsys.readouterr()
    assert main(["runs", "list", "--root", root]) == 0
    assert "clidemo" in capsys.readouterr().out
    assert main(["runs", "list", "--root", root, "--json"]) == 0
    run_ids = [json.loads(line)["run_id"] for line in capsys.readouterr().out.splitlines()]
    assert len(run_ids) == 2
    assert main(["status", run_ids[-1], "--root", root, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["stages"]["a"]["status"] == "done"
    assert main(["cache", "explain", run_ids[-1], "a", "--root", root]) == 0
    explained = capsys.readouterr().out
    assert "1 of" in explained and f"compared with run {run_ids[0]}" in explained
    rows = [line.split() for line in explained.splitlines() if line.startswith("params.")]
    assert rows == [["params.n", "4", "5", "changed"]]  # only what changed, old -> new
    assert main(["cache", "explain", run_ids[-1], "a", "--root", root, "--all"]) == 0
    everything = capsys.readouterr().out
    assert "code.modules.cmflow.stages.demo" in everything and "code.versions.numpy" in everything
    # a fully cached rerun, as a real process: every stage a hit, and Ray not even imported
    code = (
        "import sys; from cmflow.cli.main import main; rc = main(['run', sys.argv[1], '--set', "
        "'stages.a.params.n=5']); print('ray imported:', 'ray' in sys.modules); sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(spec_file)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "ray imported: False" in done.stdout
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in done.stdout.splitlines() if "│" in line]
    assert {row[0]: row[2] for row in cells if row and row[0]} == {"a": "hit", "b": "hit"}, done.stdout

    # a corrupt run.json is listed as unreadable, not dropped
    broken = Path(root, "runs", "broken", "run.json")
    broken.parent.mkdir()
    broken.write_text("{not json")
    assert main(["runs", "list", "--root", root, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    listed = [r["run_id"] for r in rows]  # the two runs above, the cached rerun, then the unreadable one
    assert listed[:2] == run_ids and len(listed) == 4 and listed[-1] == "broken", listed
    assert rows[-1]["status"] == "unreadable" and rows[-1]["error"].startswith("not JSON")
    assert main(["runs", "list", "--root", root]) == 0  # the table (rich wraps its columns at 80)
    capsys.readouterr()


@pytest.mark.usefixtures("ray_session")
def test_status_runs_list_and_resume_take_the_storage_options(
    tmp_path: Path,
    s3_root: tuple[str, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, options = s3_root
    endpoint = options["endpoint_url"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint is known only from storage.options
    path = tmp_path / "s3.yaml"
    path.write_text(SPEC.replace("{root: %s}", f"{{root: {root}, options: {{endpoint_url: {endpoint}}}}}"))
    assert main(["run", str(path), "--run-id", "opts-1"]) == 0
    capsys.readouterr()
    opt = ["--root", root, "--storage-option", f"endpoint_url={endpoint}"]
    assert main(["status", "opts-1", *opt, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "succeeded"
    assert main(["runs", "list", *opt, "--json"]) == 0
    assert [json.loads(line)["run_id"] for line in capsys.readouterr().out.splitlines()] == ["opts-1"]
    assert main(["resume", "opts-1", *opt]) == 0  # the recorded spec's options: every stage a hit
    capsys.readouterr()
    assert main(["status", "opts-1", *opt, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["attempts"] == 2 and {s["status"] for s in record["stages"].values()} == {"hit"}


@pytest.mark.usefixtures("ray_session")
def test_failed_run_exits_1_and_resume(spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(spec_file.parent / "root")
    assert main(["run", str(spec_file), "--set", "stages.a.params.fail=true", "--run-id", "clidemo-r1"]) == 1
    err = capsys.readouterr().err
    assert "error: run clidemo-r1 failed" in err and "Traceback" not in err
    assert main(["resume", "clidemo-r1", "--root", root, "--set", "stages.a.params.fail=false"]) == 0


def test_tables_list_pipeline_order_keep_values_whole_and_say_progress_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rich.console import Console

    from cmflow.cli.display import pipeline_order, progress_text, stage_table
    from cmflow.cli.models import rounded
    from cmflow.engine.driver import progress_key
    from cmflow.engine.records import RunRecord
    from cmflow.storage import Storage

    stages = {  # as a stored record reads back: names sorted
        "data": {"kind": "prepare_data"},
        "evaluate": {"kind": "evaluate", "inputs": {"model": "teacher", "data": "data"}},
        "teacher": {"kind": "teacher", "inputs": {"data": "data"}},
    }
    record = RunRecord.start(
        "r-1", {"name": "p", "stages": stages}, {n: v["kind"] for n, v in stages.items()}
    )
    assert pipeline_order(record) == ["data", "teacher", "evaluate"]
    meta = {"fid_1step": 7.123456, "fid_2step": 5.5123, "model_digest": "0123456789abcdef01", "steps": 2200}
    for srec in record.stages.values():
        srec.status, srec.meta = "done", meta
    console = Console(width=80, record=True)
    console.print(stage_table(record, final=True))
    text = console.export_text()
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.count("│") > 2]
    assert [r for r in rows if r] == ["data", "teacher", "evaluate"]
    for value in ("fid_1step=7.123", "fid_2step=5.512", "steps=2200"):
        assert text.count(value) == 3, text  # wrapped between values, never inside one

    progress = {
        "done": 400,
        "total": 2200,
        "metrics": {"step": 400, "loss": 0.52691, "imgs_per_s": 1137.2},
        "message": "loss 0.5269, 1137 img/s",
    }
    assert progress_text(progress) == "step 400/2200 (18%), loss 0.5269, 1137 img/s"
    storage = Storage(str(tmp_path / "root"))  # `cmflow status` of a live run: the driver's saved progress
    record.stages["teacher"].status = "running"
    record.save(storage)
    storage.write_json(progress_key(record.run_id), {"teacher": progress})
    assert main(["status", record.run_id, "--root", storage.root]) == 0
    out = capsys.readouterr().out
    assert "step 400/2200 (18%)," in out and "1137 img/s" in out, out
    assert progress_text({"done": 3, "total": 4, "message": "3/4 images"}) == "75% 3/4 images"
    assert [rounded(v) for v in ("7.123456789", "1.0", "0.000123456", "digits")] == [
        "7.123",
        "1",
        "0.0001235",
        "digits",
    ]


def test_sigterm_stops_a_run_quietly_with_its_time(spec_file: Path) -> None:
    """`cmflow stop` sends SIGTERM: the run ends as stopped, and Ray's noise (its IP-probe warning, its C++
    stack dump on SIGTERM) does not reach the terminal. A real process starting its own local Ray."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    err = spec_file.with_name("stderr.txt")
    argv = [sys.executable, "-m", "cmflow.cli.main", "run", str(spec_file), "--run-id", "clidemo-term"]
    argv += ["--set", "stages.a.params.sleep_s=60", "--set", "ray.num_cpus=1"]
    with open(err, "w") as handle:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=handle, env=env)
    deadline = time.monotonic() + 120
    while "[cmflow] a: running" not in err.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, err.read_text()
    text = err.read_text()
    assert "SIGTERM received" not in text and "Failed to determine local IP" not in text, text
    assert "Traceback" not in text and "[cmflow] a: stopped (" in text, text
    record = json.loads((spec_file.parent / "root" / "runs" / "clidemo-term" / "run.json").read_text())
    assert record["status"] == "stopped" and record["stages"]["a"]["seconds"] >= 1.0


def test_real_subprocess_help_is_fast_and_validate_works(spec_file: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys, cmflow.cli.main as m; m.main(['--help']); print(sorted(k for k in ('torch','ray','mlflow') if k in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.strip().endswith("[]"), "heavy modules imported by --help"
    exe = Path(sys.executable).with_name("cmflow")
    start = time.time()
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "validate" in done.stdout
    assert time.time() - start < 30  # generous: a sanity bound, the benchmark measures it
    done = subprocess.run([str(exe), "validate", str(spec_file)], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "ok" in done.stdout
    bad = spec_file.with_name("bad.yaml")
    bad.write_text("name: x\nstages: {a: {kind: nope}}\n")
    done = subprocess.run([str(exe), "validate", str(bad)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
