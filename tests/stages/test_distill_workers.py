"""distill on 2 Ray Train workers (CPU, gloo): the loss falls, a killed worker is replaced and the run
resumes from its last checkpoint, and a rerun with the same cache key resumes from the final one."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from stage_helpers import artifact, direct_ctx

from cmflow.spec import Resources
from cmflow.stages.distill import DistillParams, distill
from cmflow.storage import Manifest, Storage


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _checkpoint_steps(pid_dir: Path) -> list[int]:
    path = pid_dir / "checkpoints.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_two_workers_loss_falls_and_a_killed_worker_resumes_from_a_checkpoint(
    ray_session: None, digits_store: tuple[Storage, Manifest], tiny_teacher: Manifest, tmp_path: Path
) -> None:
    storage, data = digits_store
    pid_dir = tmp_path / "pids"
    params = DistillParams(
        steps=600,
        batch_size=32,
        lr=1e-3,
        checkpoint_every=20,
        log_every=20,
        grid_samples=0,
        max_failures=2,
        pid_dir=str(pid_dir),
    )
    ctx = direct_ctx(storage, tmp_path, "distill", resources=Resources(cpus=1, workers=2))
    inputs = {"teacher": artifact(storage, tiny_teacher), "data": artifact(storage, data)}
    killed: dict = {}

    def killer() -> None:  # Ray Train's fit() stays in the main thread; this one kills rank 1 mid-run
        try:
            _wait_for(lambda: len(_checkpoint_steps(pid_dir)) >= 2, 300, "two checkpoints")
            killed["survived"] = _checkpoint_steps(pid_dir)[0]  # reported before the latest: surely recorded
            killed["pid"] = int((pid_dir / "rank1.pid").read_text())
            os.kill(killed["pid"], signal.SIGKILL)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            killed["error"] = exc

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    meta = distill(params, inputs, ctx)
    thread.join(timeout=5)
    assert "error" not in killed and "pid" in killed, killed
    survived, victim = killed["survived"], killed["pid"]
    assert meta["steps"] == 600
    assert meta["resumed_from_step"] >= survived > 0 and meta["resumed_from_step"] % 20 == 0
    assert int((pid_dir / "rank1.pid").read_text()) != victim  # a new worker took rank 1
    losses = [row["loss"] for row in ctx.metrics]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert (ctx.out_dir / "model.safetensors").exists() and (ctx.out_dir / "online.safetensors").exists()

    # A rerun with the same cache key (a resumed pipeline) finds the Ray Train run in the work folder and
    # continues from its last checkpoint: here the final one, so no step is repeated.
    again = direct_ctx(storage, tmp_path, "distill", resources=Resources(cpus=1, workers=2))
    again.cache_key = ctx.cache_key
    rerun = distill(params.model_copy(update={"pid_dir": None}), inputs, again)
    assert rerun["resumed_from_step"] == 600 and rerun["steps"] == 600
    assert (again.out_dir / "model.safetensors").read_bytes() == (
        ctx.out_dir / "model.safetensors"
    ).read_bytes()
