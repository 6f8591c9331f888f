"""Training on Ray Train workers (CPU, gloo) with the dataset streamed through Ray Data.

* The streamed lanes hold exactly the rows of the sample order (the in-memory reference), shard by shard.
* 2 workers x batch B/2 train the same weights as 1 worker x batch B (same lanes, per-sample seeds,
  dropout off) for the teacher, distill and train_cm.
* A worker killed with SIGKILL while the artifacts live on the S3 endpoint is replaced; training resumes
  from the checkpoint stored on S3 and loses at most one checkpoint interval -- checked against the last
  checkpoint Ray Train had registered before the kill.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from stage_helpers import artifact, direct_ctx, run_stage

from cmflow.spec import Resources
from cmflow.storage import Manifest, Storage

pytestmark = pytest.mark.slow


def _plan(storage: Storage, data: Manifest, *, lanes: int, batch: int, steps: int, seed: int = 3) -> Any:
    from cmflow.distributed.train import TrainJob, stream_plan

    ctx = direct_ctx(storage, Path("/tmp"), "distill", resources=Resources(workers=1))
    job = TrainJob(
        method="cd",
        params={"lanes": lanes, "batch_size": batch, "steps": steps, "shuffle_window": 40},
        seed=seed,
        stage="distill",
        data=artifact(storage, data),
    )
    return stream_plan(job, ctx)


def test_streamed_lanes_hold_the_rows_of_the_sample_order(ray_session: None, tmp_path: Path) -> None:
    from cmflow.distributed.data import StreamBatches
    from cmflow.training.loop import ArrayBatches

    storage = Storage(str(tmp_path / "store"))
    data = run_stage(
        storage,
        "prepare_data",
        {"source": "sklearn-digits", "max_images": 300, "shard_images": 64, "use_labels": True},
    )
    plan = _plan(storage, data, lanes=2, batch=20, steps=40)
    from cmflow.data.shards import read_dataset

    images, labels, _ = read_dataset(artifact(storage, data).read_bytes)
    reference = ArrayBatches(images, labels, 20, seed=plan.seed, order=plan.order)
    shards = {lane: plan.dataset(lane, 0).iterator() for lane in range(2)}
    streamed = StreamBatches(plan, 0, 1, torch.device("cpu"), shards)
    for step in range(40):  # > 2 epochs of 150 rows per lane, across 5 shards of 64
        got, want = streamed.batch(step), reference.batch(step)
        assert torch.equal(got.x, want.x) and torch.equal(got.labels, want.labels)
        assert got.generator.seeds == want.generator.seeds
    # a stream that starts at an older checkpoint skips forward; one that starts later is rebuilt
    late = StreamBatches(plan, 1, 2, torch.device("cpu"), {1: plan.dataset(1, 30).iterator()})
    early = StreamBatches(plan, 1, 2, torch.device("cpu"), {1: plan.dataset(1, 5).iterator()})
    rank1 = ArrayBatches(images, labels, 20, seed=plan.seed, order=plan.order, rank=1, world=2)
    for stream in (late, early):
        assert torch.equal(stream.batch(12).x, rank1.batch(12).x)


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return st_load((folder / name).read_bytes())


def _train(kind: str, params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from cmflow.stages.distill import DistillParams, TrainCMParams, distill, train_cm
    from cmflow.stages.teacher import TeacherParams, teacher

    fn, model = {
        "teacher": (teacher, TeacherParams),
        "distill": (distill, DistillParams),
        "train_cm": (train_cm, TrainCMParams),
    }[kind]
    return fn(model(**params), inputs, ctx)


@pytest.mark.parametrize("kind", ["teacher", "distill", "train_cm"])
def test_two_workers_train_what_one_worker_does(
    kind: str,
    ray_session: None,
    digits_store: tuple[Storage, Manifest],
    tiny_teacher: Manifest,
    tmp_path: Path,
) -> None:
    storage, data = digits_store
    params: dict[str, Any] = {"steps": 6, "batch_size": 16, "lanes": 2, "checkpoint_every": 0, "grid_samples": 0,
                              "log_every": 3, "lr": 2e-3}  # fmt: skip
    if kind != "distill":
        params["preset"] = "tiny"
    if kind == "train_cm":
        params.update(method="ict", s0=4, s1=16)
    inputs = {"data": artifact(storage, data)}
    if kind == "distill":
        inputs["teacher"] = artifact(storage, tiny_teacher)
    outputs = {}
    for workers in (1, 2):
        ctx = direct_ctx(storage, tmp_path, kind, resources=Resources(cpus=1, workers=workers))
        meta = _train(kind, params, inputs, ctx)
        assert meta["steps"] == 6
        outputs[workers] = ctx.out_dir
    raw = "raw.safetensors" if kind == "teacher" else "online.safetensors"
    ema, online = _weights(outputs[1], "model.safetensors"), _weights(outputs[1], raw)
    assert max(float((online[k] - ema[k]).abs().max()) for k in ema) > 1e-5  # training moved the weights
    for name in ("model.safetensors", raw):
        one, two = _weights(outputs[1], name), _weights(outputs[2], name)
        for key in one:  # DDP's mean of two half-batch gradients = the full-batch gradient, up to rounding
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-6, msg=f"{name}:{key}")


def _workers() -> list[Any]:
    import psutil

    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")
    ]


def _registered_step(storage: Storage, key: str) -> int:
    from cmflow.distributed.data import POSITION_FILE

    try:
        return int(
            json.loads(storage.read_bytes(f"{Storage.work_prefix('distill', key)}/{POSITION_FILE}"))["step"]
        )
    except FileNotFoundError:
        return 0


def test_a_killed_worker_resumes_from_the_last_checkpoint_on_s3(
    ray_session: None,
    s3_root: tuple[str, dict],
    tiny_teacher: Manifest,
    digits_store: tuple[Storage, Manifest],
    tmp_path: Path,
) -> None:
    from cmflow.stages.distill import DistillParams, distill

    local, _ = digits_store
    root, options = s3_root
    storage = Storage(root, options)
    data = run_stage(
        storage, "prepare_data", {"source": "sklearn-digits", "max_images": 256, "use_labels": False}
    )
    teacher_folder = tmp_path / "teacher"
    teacher_folder.mkdir()
    for name in ("model.json", "model.safetensors"):
        (teacher_folder / name).write_bytes(artifact(local, tiny_teacher).read_bytes(name))
    teacher = storage.commit("teacher", "t" * 64, teacher_folder)
    interval = 20
    params = DistillParams(
        steps=200,
        batch_size=32,
        lr=1e-3,
        checkpoint_every=interval,
        log_every=20,
        grid_samples=0,
        max_failures=2,
    )
    ctx = direct_ctx(storage, tmp_path, "distill", resources=Resources(cpus=1, workers=2))
    killed: dict[str, Any] = {}

    def killer() -> None:  # fit() runs in the main thread; this one kills a worker mid-run
        try:
            deadline = time.time() + 300
            while _registered_step(storage, ctx.cache_key) < 2 * interval:
                assert time.time() < deadline, "no second checkpoint in 300 s"
                time.sleep(0.05)
            workers = _workers()
            assert len(workers) == 2, [w.info["cmdline"] for w in workers]
            killed["last_registered"] = _registered_step(storage, ctx.cache_key)
            killed["pid"] = workers[-1].pid
            os.kill(killed["pid"], signal.SIGKILL)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            killed["error"] = exc

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    meta = distill(params, {"teacher": artifact(storage, teacher), "data": artifact(storage, data)}, ctx)
    thread.join(timeout=5)
    assert "error" not in killed, killed.get("error")
    assert meta["steps"] == 200
    # resumed from the last checkpoint registered before the kill (or a later one), so at most one
    # checkpoint interval of training was lost
    assert meta["resumed_from_step"] >= killed["last_registered"] >= 2 * interval
    assert meta["resumed_from_step"] % interval == 0
    assert killed["pid"] not in {w.pid for w in _workers()}
    runs = storage.list(Storage.work_prefix("distill", ctx.cache_key))
    from cmflow.distributed.train import CHECKPOINT_DIR

    kept = [name for name in runs if CHECKPOINT_DIR.match(name)]
    assert 1 <= len(kept) <= 2, runs  # num_to_keep = 2; folders Ray Train does not keep are removed
    losses = [row["loss"] for row in ctx.metrics]
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3])
