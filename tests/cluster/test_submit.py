"""A real `ray start --head` (token auth on, 127.0.0.1, own temp dir) receives `cmflow submit`.

The head is a subprocess started and stopped by its own PID (process group); nothing calls `ray stop`.
This pytest process never calls `ray.init`: the job server is reached over HTTP only, and the commands that
need a Ray connection (`cmflow scheduler ...`) run as subprocesses.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import demo_spec, free_port, write_spec

from cmflow.cli.main import main
from cmflow.errors import ClusterError
from cmflow.schedule.cron import parse_time
from cmflow.schedule.store import create_schedule, list_schedules, load_schedule, new_schedule
from cmflow.schedule.tick import DuplicateSubmission, tick
from cmflow.storage import Manifest, Storage
from cmflow.submit import (
    ClusterTarget,
    RayJobSubmitter,
    job_client,
    load_submission,
    submit_spec,
)
from cmflow.validate import load_spec, validate_spec

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`ray start --head --block` with token auth, its own HOME and temp dir; killed by process group."""
    home = tmp_path_factory.mktemp("home")
    temp = tmp_path_factory.mktemp("rayhead")
    token = secrets.token_hex(32)
    gcs, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    log = open(temp / "head.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            "--block",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    target = ClusterTarget(address, token)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited: {(temp / 'head.log').read_text()[-3000:]}")
        try:
            job_client(target).list_jobs()
            return True
        except ClusterError:
            return False

    wait_until(ready, 120, "the Ray job server")
    token_file = temp / "token"
    token_file.write_text(token + "\n")
    yield {
        "address": address,
        "gcs": f"127.0.0.1:{gcs}",
        "token": token,
        "token_file": str(token_file),
        "env": env,
        "target": target,
    }
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def job_status(head: dict[str, Any], submission_id: str) -> str:
    return str(job_client(head["target"]).get_job_status(submission_id).value)


# ---------------------------------------------------------------------------------------------- submit


def test_submit_wait_status_logs_and_duplicate_refused(
    head: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "root")
    spec = write_spec(tmp_path / "tiny.yaml", demo_spec(root))
    args = [
        "submit",
        str(spec),
        "--address",
        head["address"],
        "--token-file",
        head["token_file"],
        "--run-id",
        "tiny-1",
    ]
    assert main([*args, "--wait", "--timeout-s", "180"]) == 0, capsys.readouterr()
    captured = capsys.readouterr()
    out = captured.out
    assert "submitted run tiny-1" in out and "run tiny-1 succeeded" in out
    assert "[cmflow] total: done" in out, out  # the driver's log, streamed while the job ran
    assert "Uploading package" not in out + captured.err
    assert job_status(head, "tiny-1") == "SUCCEEDED"

    # without a token, status still shows the run record and says why the job server did not answer
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["status", "tiny-1", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "UNAVAILABLE" in out and "requires a token" in out and "total" in out
    # the driver on the cluster wrote the run record into the storage root
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["token"])
    assert main(["status", "tiny-1", "--root", root, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "succeeded" and data["ray_job"]["status"] == "SUCCEEDED"
    assert {s["status"] for s in data["stages"].values()} == {"done"}
    assert data["submission"]["address"] == head["address"]
    assert main(["status", "tiny-1", "--root", root]) == 0
    assert "Ray job tiny-1" in capsys.readouterr().out

    assert main(["logs", "tiny-1", "--root", root, "--token-file", head["token_file"]]) == 0
    assert "run tiny-1 succeeded" in capsys.readouterr().out

    # --wait on a run whose stage fails prints the driver's one-line error in full
    failing = [*args[:-1], "tiny-bad", "--set", "stages.left.params.fail=true"]
    assert main([*failing, "--wait", "--timeout-s", "180"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        "error: run tiny-bad ended FAILED: stage 'left' failed: stage 'left' was told to fail"
    )
    assert "set it to false and resume; see `cmflow logs tiny-bad`" in err

    # a repeated submit of the same run id is refused, not duplicated
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already submitted" in err and err.count("\n") == 1
    jobs = [j for j in job_client(head["target"]).list_jobs() if j.submission_id == "tiny-1"]
    assert len(jobs) == 1

    # ... and so is a job id the cluster already has, even without the index
    fresh = Storage(str(tmp_path / "other-root"))
    loaded = validate_spec({**demo_spec(fresh.root)})
    with pytest.raises(DuplicateSubmission, match="already has a job 'tiny-1'"):
        submit_spec(loaded, head["target"], run_id="tiny-1")
    assert load_submission(fresh, "tiny-1") is None


def test_token_auth_is_required_and_checked(
    head: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    spec = write_spec(tmp_path / "tiny.yaml", demo_spec(str(tmp_path / "root")))
    assert main(["submit", str(spec), "--address", head["address"]]) == 2
    bad = tmp_path / "bad-token"
    bad.write_text("0" * 64)
    assert main(["submit", str(spec), "--address", head["address"], "--token-file", str(bad)]) == 2
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["token"])
    assert job_client(ClusterTarget(head["address"], head["token"])).list_jobs() is not None
    with pytest.raises(ClusterError, match="requires a token"):
        job_client(ClusterTarget(head["address"], None))
    with pytest.raises(ClusterError, match="rejected the token"):
        job_client(ClusterTarget(head["address"], "0" * 64))


def test_unreachable_cluster_and_local_root_on_a_remote_cluster_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = write_spec(tmp_path / "tiny.yaml", demo_spec(str(tmp_path / "root")))
    assert main(["submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the Ray job server" in capsys.readouterr().err
    assert main(["submit", str(spec), "--address", "http://head.example.com:8265"]) == 2
    assert "is a local path, which the cluster" in capsys.readouterr().err


def test_submit_checks_storage_and_tracking_before_it_submits(
    tmp_path: Path,
    s3_root: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Each refusal comes before the job server is contacted (none listens at ``address``)."""
    root, options = s3_root
    address = ["--address", f"http://127.0.0.1:{free_port()}"]
    tracked = {**demo_spec(root, options=options), "tracking": {"enabled": True}}
    spec = write_spec(tmp_path / "s3.yaml", tracked)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def refused(*extra: str) -> str:
        assert main(["submit", str(spec), *address, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Ray job server" not in err, err
        return err

    fix = "set tracking.uri or MLFLOW_TRACKING_URI to an MLflow server"
    assert "is not local, so " + fix in refused()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert "is a local store the cluster's nodes cannot share; " + fix in refused()
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    assert f"MLflow tracking at {dead} is not reachable from here" in refused()
    assert "not reachable" in refused("--set", f"tracking.uri={dead}")  # tracking.uri comes first
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    err = refused("--set", f"storage.options.endpoint_url={dead}", "--set", "tracking.enabled=false")
    assert "storage.root s3://" in err and "is not reachable from here" in err
    assert "check storage.root, storage.options (endpoint_url)" in err


def test_stop_then_resume_resubmits_with_the_same_run_id(
    head: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "root")
    spec = write_spec(tmp_path / "slow.yaml", demo_spec(root, sleep_s=120))
    token = ["--token-file", head["token_file"]]
    assert main(["submit", str(spec), "--address", head["address"], "--run-id", "slow-1", *token]) == 0
    assert "submitted run slow-1" in capsys.readouterr().out
    storage = Storage(root)
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["token"])

    def driver_running(attempt: int) -> bool:
        if not storage.exists("runs/slow-1/run.json"):
            return False
        record = storage.read_json("runs/slow-1/run.json")
        return record["attempts"] == attempt and record["stages"]["left"]["status"] == "running"

    def reads(status: str) -> dict[str, Any]:
        assert main(["runs", "list", "--root", root, "--json"]) == 0
        assert [json.loads(line)["status"] for line in capsys.readouterr().out.splitlines()] == [status]
        assert main(["status", "slow-1", "--root", root, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    # the driver dies (kill -9): the record still says running, Ray says FAILED; the run reads failed
    wait_until(lambda: driver_running(1), 120, "the driver to start")
    os.kill(storage.read_json("runs/slow-1/run.json")["driver"]["pid"], signal.SIGKILL)
    wait_until(lambda: job_status(head, "slow-1") == "FAILED", 60, "Ray to see the driver die")
    assert storage.read_json("runs/slow-1/run.json")["status"] == "running"
    data = reads("failed")
    assert data["error"].startswith("the driver died (Ray job slow-1 FAILED: Job entrypoint command failed")
    assert data["stages"]["left"]["status"] == "failed"

    # resubmitted, then stopped: the run reads stopped (never "failed: the driver stopped")
    assert main(["resume", "slow-1", "--root", root]) == 0
    assert "resubmitted run slow-1 as Ray job slow-1-r1" in capsys.readouterr().out
    wait_until(lambda: driver_running(2), 120, "the resubmitted driver to start")
    assert main(["stop", "slow-1", "--root", root, *token]) == 0
    assert "stopping run slow-1" in capsys.readouterr().out
    wait_until(lambda: job_status(head, "slow-1-r1") == "STOPPED", 60, "the job to stop")
    data = reads("stopped")
    assert data["ray_job"]["status"] == "STOPPED" and "the driver stopped" not in json.dumps(data)
    assert data["stages"]["left"]["status"] == "stopped"  # interrupted, with the time it ran

    # resume: a new Ray job slow-1-r2 running the same cmflow run id (sleep_s is not in the cache key)
    assert main(["resume", "slow-1", "--root", root, "--set", "stages.left.params.sleep_s=0"]) == 0
    assert "resubmitted run slow-1 as Ray job slow-1-r2" in capsys.readouterr().out
    assert main(["logs", "slow-1", "--root", root, "--follow", *token]) == 0  # streams until the job ends
    assert "run slow-1 succeeded" in capsys.readouterr().out
    assert job_status(head, "slow-1-r2") == "SUCCEEDED"
    sub = load_submission(storage, "slow-1")
    assert [s["id"] for s in sub.submissions] == ["slow-1", "slow-1-r1", "slow-1-r2"]
    record = json.loads(Path(root, "runs/slow-1/run.json").read_text())
    assert record["status"] == "succeeded" and record["attempts"] == 3
    # `right` finished before the stop: a cache hit now
    assert record["stages"]["right"]["status"] in {"hit", "done"}


# ---------------------------------------------------------------------------------------------- schedules


def test_schedule_tick_submits_a_real_job_once(head: dict[str, Any], tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    storage = Storage(root)
    spec = load_spec(write_spec(tmp_path / "tiny.yaml", demo_spec(root, name="weekly")))
    created = datetime.now(timezone.utc)
    schedule = new_schedule(
        spec.model_dump(mode="json"),
        now=created,
        cron="0 3 * * 1",
        timezone_name="Europe/Paris",
        address=head["address"],
        schedule_id="weekly",
    )
    create_schedule(storage, schedule)
    later = created + timedelta(days=8)  # at least one Monday 03:00 Paris in between
    submitter = RayJobSubmitter(token=head["token"])
    fires = tick(later, storage, submitter)
    assert [f.outcome for f in fires] == ["submitted"]
    run_id = fires[0].run_id
    assert run_id == f"cmflow-weekly-{int(parse_time(fires[0].fire_time).timestamp())}"
    info = job_client(head["target"]).get_job_info(run_id)
    assert (
        info.metadata["cmflow_schedule"] == "weekly"
        and info.metadata["cmflow_fire_time"] == fires[0].fire_time
    )
    # a second scheduler ticking at the same time: no second job
    assert [f.outcome for f in tick(later, Storage(root), submitter)] in ([], ["taken"])
    with pytest.raises(DuplicateSubmission):  # and the job server refuses the id too
        submitter.submit(load_schedule(storage, "weekly"), run_id, {})
    wait_until(lambda: job_status(head, run_id) in {"SUCCEEDED", "FAILED"}, 180, "the scheduled run")
    assert job_status(head, run_id) == "SUCCEEDED"
    assert load_submission(storage, run_id).address == head["address"]


def scheduler_cli(head: dict[str, Any], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmflow.cli.main", "scheduler", *args, "--address", head["gcs"]],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_scheduler_actor_fires_triggers_and_survives_a_restart(head: dict[str, Any], tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    storage = Storage(root)
    spec = load_spec(write_spec(tmp_path / "tiny.yaml", demo_spec(root, name="ondata")))
    watched = tmp_path / "data" / "manifest.json"
    watched.parent.mkdir()

    def publish(n: int) -> str:
        manifest = Manifest(kind="dataset", cache_key=f"{n:064x}", attempt="a", files={}, meta={"n": n})
        watched.write_text(manifest.to_json())
        return manifest.digest

    create_schedule(
        storage,
        new_schedule(
            spec.model_dump(mode="json"),
            now=datetime.now(timezone.utc),
            trigger_manifest=str(watched),
            address=head["address"],
            schedule_id="ondata",
        ),
    )
    started = scheduler_cli(head, "start", "--root", root, "--interval-s", "1")
    assert started.returncode == 0, started.stderr
    assert "scheduler running" in started.stdout

    def marker(digest: str) -> dict | None:
        try:
            data = storage.read_json(f"schedules/ondata/triggers/{digest}.json")
        except FileNotFoundError:
            return None
        return data if data["status"] != "claimed" else None

    d1 = publish(1)
    assert wait_until(lambda: marker(d1), 90, "the first trigger")["status"] == "submitted"
    before = json.loads(scheduler_cli(head, "status", "--json").stdout)
    assert before["fired"] == 1

    kill = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import ray; ray.init(address={head['gcs']!r}, namespace='cmflow'); "
            "ray.kill(ray.get_actor('cmflow-scheduler', namespace='cmflow'), no_restart=False)",
        ],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert kill.returncode == 0, kill.stderr

    def restarted() -> dict | None:
        result = scheduler_cli(head, "status", "--json")
        state = json.loads(result.stdout) if result.returncode == 0 and result.stdout.strip() else None
        return state if state and state["pid"] != before["pid"] and state["ticks"] >= 1 else None

    after = wait_until(restarted, 120, "the actor to restart", poll_s=2)
    assert after["root"] == root and after["interval_s"] == 1.0  # same constructor arguments
    assert [s.id for s in list_schedules(storage)] == ["ondata"]
    d2 = publish(2)
    assert wait_until(lambda: marker(d2), 90, "the second trigger")["status"] == "submitted"
    time.sleep(3)  # a few more ticks: nothing fires twice
    markers = [name for name in storage.list("schedules/ondata/triggers")]
    assert markers == sorted([f"{d1}.json", f"{d2}.json"])
    jobs = {j.submission_id for j in job_client(head["target"]).list_jobs()}
    assert {f"cmflow-ondata-d{d1[:16]}", f"cmflow-ondata-d{d2[:16]}"} <= jobs

    stopped = scheduler_cli(head, "stop")
    assert stopped.returncode == 0 and "scheduler stopped" in stopped.stdout, stopped.stderr
    gone = scheduler_cli(head, "status")
    assert "no scheduler is running" in gone.stdout
