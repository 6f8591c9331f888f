"""Faults around the engine: a killed driver, a flaky or dead S3 endpoint, concurrent runs of one spec,
and damaged artifacts. Each proves that no finished work is lost and no wrong result is reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cmflow.engine import RunRecord, list_runs, run_pipeline, storage_for
from cmflow.storage import Storage
from cmflow.validate import validate_spec

REPO = Path(__file__).resolve().parents[2]


def chain(
    root: str, options: dict[str, Any] | None = None, *, sleep_b: float = 0.0, retries: int = 6
) -> dict:
    return {
        "name": "chain",
        "storage": {"root": root, "options": options or {}, "retries": retries},
        "tracking": {"enabled": False},
        "stages": {
            "a": {"kind": "demo.arrays", "params": {"n": 16}},
            "b": {"kind": "demo.arrays", "params": {"n": 16, "seed": 1, "sleep_s": sleep_b}, "retries": 0},
            "c": {"kind": "demo.reduce", "inputs": {"a": "a", "b": "b"}},
        },
    }


def statuses(record: RunRecord) -> dict[str, str]:
    return {n: s.status for n, s in record.stages.items()}


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_driver_then_rerun_completes_with_hits(tmp_path: Path) -> None:
    """kill -9 the driver (and its local Ray) mid-pipeline; the next run reuses what was committed."""
    root = tmp_path / "root"
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(chain(str(root), sleep_b=60)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(
        [str(Path(sys.executable).with_name("cmflow")), "run", str(spec_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    storage = Storage(str(root))

    def a_done() -> bool:
        runs = list_runs(storage)
        return bool(runs) and runs[0].stages["a"].status == "done" and runs[0].stages["b"].status == "running"

    try:
        wait_for(a_done, 90, "stage a to commit while b runs")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    dead = list_runs(storage)[0]
    assert (
        dead.status == "running" and dead.stages["b"].status == "running"
    )  # the record the dead driver left

    # sleep_s is cache-ignored, so the rerun has the same keys but need not wait
    again = run_pipeline(validate_spec(chain(str(root), sleep_b=0)), address=None)
    assert statuses(again) == {"a": "hit", "b": "done", "c": "done"}


@pytest.mark.usefixtures("ray_session")
def test_concurrent_runs_of_one_spec_commit_each_key_once(tmp_path: Path) -> None:
    spec = validate_spec(chain(str(tmp_path / "root"), sleep_b=1.0))
    results: list[RunRecord] = []
    threads = [threading.Thread(target=lambda: results.append(run_pipeline(spec))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status for r in results] == ["succeeded", "succeeded"]
    storage = storage_for(spec)
    for name in ("a", "b", "c"):
        keys = {r.stages[name].cache_key for r in results}
        assert len(keys) == 1
        key = keys.pop()
        prefix = Storage.artifact_prefix(spec.stages[name].kind, key)
        manifest = storage.load_manifest(spec.stages[name].kind, key)
        assert manifest is not None
        assert storage.list(f"{prefix}/attempts") == [manifest.attempt]  # losers removed their attempts
        assert {r.stages[name].manifest_digest for r in results} == {manifest.digest}


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("damage", ["delete", "tamper"])
def test_damaged_artifact_is_recomputed_not_reused(tmp_path: Path, damage: str) -> None:
    spec = validate_spec(chain(str(tmp_path / "root")))
    first = run_pipeline(spec)
    storage = storage_for(spec)
    srec = first.stages["a"]
    manifest = storage.load_manifest("demo.arrays", srec.cache_key)
    path = Path(
        storage.path(
            f"{Storage.artifact_prefix('demo.arrays', srec.cache_key)}/attempts/{manifest.attempt}/values.npy"
        )
    )
    if damage == "delete":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    second = run_pipeline(spec)
    assert second.stages["a"].status == "done" and "values.npy" in second.stages["a"].reason
    assert second.stages["a"].manifest_digest == srec.manifest_digest  # same bytes recomputed
    assert statuses(second)["b"] == "hit"
    # the damaged manifest was moved aside with its reason, not deleted
    prefix = Storage.artifact_prefix("demo.arrays", srec.cache_key)
    moved = storage.list(f"{prefix}/quarantine")
    assert len(moved) == 1, moved
    aside = storage.read_json(f"{prefix}/quarantine/{moved[0]}")
    assert "values.npy" in aside["reason"] and json.loads(aside["manifest"])["attempt"] == manifest.attempt


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto(port: int):  # noqa: ANN202
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.mark.usefixtures("ray_session")
def test_s3_endpoint_down_briefly_is_retried(moto_endpoint: str, tmp_path: Path) -> None:
    """A private moto endpoint goes away for ~3 s while a stage writes; the stage retries and succeeds."""
    import s3fs

    port = free_port()
    server = _moto(port)
    url = f"http://127.0.0.1:{port}"
    s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True).mkdir("flaky-bucket")
    spec = validate_spec(chain("s3://flaky-bucket/root", {"endpoint_url": url}, sleep_b=2.0))
    outage = threading.Timer(1.5, server.stop)
    outage.start()
    restart = threading.Timer(4.5, lambda: _moto(port))
    restart.start()
    try:
        record = run_pipeline(spec)
    finally:
        outage.join()
        restart.join()
    assert record.status == "succeeded", record.error
    assert statuses(record) == {"a": "done", "b": "done", "c": "done"}


def test_a_storage_call_during_an_outage_is_retried_until_the_endpoint_is_back(
    moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry the row above relies on, counted: a write issued while the endpoint is down backs off and
    retries (logged once per retry) and lands once the endpoint is back."""
    import logging

    import s3fs

    port = free_port()
    server = _moto(port)
    url = f"http://127.0.0.1:{port}"
    s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True).mkdir("outage-bucket")
    storage = Storage(
        "s3://outage-bucket/root", {"endpoint_url": url, "config_kwargs": {"retries": {"max_attempts": 1}}}
    )
    storage.write_bytes("before", b"1")
    server.stop()
    back: list[Any] = []
    restart = threading.Timer(2.0, lambda: back.append(_moto(port)))
    restart.start()
    try:
        with caplog.at_level(logging.WARNING, logger="cmflow.storage"):
            storage.write_bytes("during", b"2")
        retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
        assert 1 <= len(retries) <= storage.retries, retries
        assert "write during failed" in retries[0] and "retry 1 of" in retries[0]
        assert storage.read_bytes("during") == b"2" and storage.read_bytes("before") == b"1"
    finally:
        restart.join()
        for started in back:
            started.stop()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.slow
def test_s3_endpoint_gone_for_good_fails_clearly_and_resumes(tmp_path: Path) -> None:
    import s3fs

    port = free_port()
    server = _moto(port)
    url = f"http://127.0.0.1:{port}"
    s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True).mkdir("dying-bucket")
    options = {"endpoint_url": url, "config_kwargs": {"retries": {"max_attempts": 1}}}
    # the run record lives in the same bucket; keep it reachable by stopping only during stage b
    spec = validate_spec(chain("s3://dying-bucket/root", options, sleep_b=2.0, retries=2))
    stopper = threading.Timer(1.0, server.stop)
    stopper.start()
    with pytest.raises(Exception) as info:  # the driver itself cannot write the record any more
        run_pipeline(spec)
    stopper.join()
    assert "failed to" in str(info.value) and "\n" not in str(info.value)
    server = _moto(port)  # the endpoint is back (moto keeps its data in this process)
    runs = list_runs(storage_for(spec))
    resumed = run_pipeline(spec, run_id=runs[0].run_id if runs else None)
    assert resumed.status == "succeeded"
    assert resumed.stages["a"].status in {"hit", "done"}
    server.stop()
