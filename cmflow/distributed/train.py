"""Training under Ray Train: ``TorchTrainer`` workers run the loops of :mod:`cmflow.training.loop`.

The EDM teacher (``teacher``), consistency distillation (``distill``) and consistency training
(``train_cm``: CT / iCT) all run here. :func:`fit` starts ``resources.workers`` workers with
``ScalingConfig(num_workers, use_gpu, resources_per_worker={"CPU", "GPU", **custom})`` (DDP over gloo on
CPUs, NCCL on GPUs). The run lives at ``RunConfig(storage_path=<root>/work/<kind>, name=<cache key>)``,
under the stage's durable work folder, so:

* **data** streams from the dataset's shards through Ray Data, one dataset per lane of the sample order
  (:mod:`cmflow.distributed.data`); rank r of W reads lanes l % W == r, each sample's noise is seeded by
  its place in the global batch, so W workers x batch B/W train on what 1 worker x batch B does;
* every ``checkpoint_every`` steps rank 0 reports a checkpoint (online, target, EMA, optimizer, step,
  loss rows, RNG) through ``ray.train.report`` (every rank calls it) and waits until Ray Train has
  registered it (``get_all_reported_checkpoints``) before training goes on, so a worker killed at any
  moment loses at most one checkpoint interval; then it records the step as the data position;
* a lost worker makes Ray Train restart the group (``FailureConfig(max_failures)``); the workers resume
  from ``ray.train.get_checkpoint()`` and the lane datasets are rebuilt from the data position;
* a rerun with the same cache key (a resumed pipeline) finds the run's snapshot in storage and resumes
  from its last checkpoint (the Train V2 replacement for ``Trainer.restore``).

Rank 0 sends progress and loss/throughput rows to the live display through the stage's reporter.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cmflow.data.shards import DatasetInfo
from cmflow.diffusion import losses
from cmflow.distributed.data import LaneDataset, StreamBatches, StreamPlan
from cmflow.distributed.errors import unwrap
from cmflow.errors import CmflowError, InputError, StageError
from cmflow.loaders import load_perceptual_uri, load_published_lpips
from cmflow.models.io import load_model
from cmflow.models.precond import CMPrecond
from cmflow.stage import Artifact, StageContext
from cmflow.storage import Storage
from cmflow.training import loop, perceptual
from cmflow.training.builders import build_cm, build_edm
from cmflow.training.checkpoint import FILENAME, checkpoint_bytes, load_checkpoint, restore
from cmflow.training.loop import LoopHooks, run_loop
from cmflow.training.order import SampleOrder
from cmflow.training.perceptual import feature_pair_loss

Method = Literal["edm", "cd", "ct", "ict"]
CHECKPOINT_DIR = re.compile(r"^checkpoint_\d{4}-\d{2}-\d{2}_[\d.-]+$")


@dataclass
class TrainJob:
    """Everything a worker needs, as references (artifacts are manifests + a storage that pickles small)."""

    method: Method
    params: dict[str, Any]  # the stage params (model_dump)
    seed: int
    stage: str
    data: Artifact
    num_classes: int = 0  # labels are fed to the network only when it is class-conditional
    teacher: Artifact | None = None
    perceptual: Artifact | None = None  # a perceptual_net output, for distance lpips / feature
    threads: int = 1
    use_gpu: bool = False
    reporter: Any = None
    stream: Any = None  # a cmflow.distributed.data.StreamPlan, filled in by fit()


def run_config_paths(ctx: StageContext) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) of the stage's Ray Train runs: ``<root>/work/<kind>``."""
    prefix = Storage.work_prefix(ctx.kind, ctx.cache_key).rsplit("/", 1)[0]
    storage = ctx.storage
    if storage.is_local:
        path = Path(storage.path(prefix))
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    import pyarrow.fs

    return storage.path(prefix), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs))


def stream_plan(job: TrainJob, ctx: StageContext) -> Any:
    """The sample order and stream of ``job``'s dataset (lanes default to the worker count)."""
    import json

    params, workers = job.params, ctx.resources.workers
    info = DatasetInfo.parse(job.data.read_bytes("dataset.json"))
    damaged = job.data.storage.verify(job.data.manifest, job.data.manifest.cache_key, rehash=False)
    if damaged:  # a shard gone or cut short: refuse before any worker starts (reads check sha256 too)
        raise InputError(
            f"stages.{ctx.stage}: its dataset artifact is damaged ({damaged}); run the pipeline again: its cache "
            "check recomputes a damaged dataset"
        )
    lanes = params.get("lanes") or workers
    where = f"stages.{ctx.stage}"
    if lanes % workers:
        raise InputError(
            f"{where}: {workers} workers cannot share {lanes} lanes evenly; set params.lanes to a multiple of "
            "resources.workers"
        )
    if params["batch_size"] % lanes:
        raise InputError(
            f"{where}: batch_size {params['batch_size']} is not divisible by the {lanes} lanes"
            f"{' (one per worker)' if not params.get('lanes') else ''}; use a multiple of {lanes}"
        )
    if lanes > info.num_images:
        raise InputError(f"{where}: {lanes} lanes for {info.num_images} images; use fewer workers or lanes")
    window = params.get("shuffle_window") or int(info.raw.get("shard_images") or max(info.shard_sizes))
    manifest = json.loads(job.data.manifest.to_json())
    manifest["uri"] = job.data.manifest.uri
    return StreamPlan(
        storage_root=ctx.storage.root,
        storage_options=ctx.storage.options,
        manifest=json.dumps(manifest),
        info=info.raw,
        order=SampleOrder(info.shard_sizes, job.seed, lanes, window),
        batch_size=params["batch_size"],
        total_steps=params["steps"],
        seed=job.seed,
        work_key=Storage.work_prefix(ctx.kind, ctx.cache_key),
    )


def fit(job: TrainJob, ctx: StageContext, *, max_failures: int = 3) -> dict[str, Any]:
    """Run the job on ``ctx.resources.workers`` Ray Train workers; returns the final checkpoint's contents."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    resources = ctx.resources
    job.stream = stream_plan(job, ctx)
    per_worker = {
        "CPU": resources.cpus,
        **({"GPU": resources.gpus} if resources.gpus else {}),
        **resources.custom,
    }
    storage_path, filesystem = run_config_paths(ctx)
    lanes = job.stream.order.lanes
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=resources.gpus > 0, resources_per_worker=per_worker
        ),
        datasets={f"lane{lane}": LaneDataset(job.stream, lane) for lane in range(lanes)},
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
        run_config=ray.train.RunConfig(
            name=ctx.cache_key,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - TrainingFailedError and friends wrap the worker's error
        raise StageError(_training_error(ctx, exc, max_failures)) from None
    if result.checkpoint is None:
        raise StageError(f"stage {ctx.stage!r}: training ended without a checkpoint; resume the run")
    with result.checkpoint.as_directory() as folder:
        content = load_checkpoint((Path(folder) / FILENAME).read_bytes())
    if not content.get("done"):
        raise StageError(f"stage {ctx.stage!r}: the last checkpoint is not the final one; resume the run")
    _remove_unregistered_checkpoints(ctx, result)
    return content


def _remove_unregistered_checkpoints(ctx: StageContext, result: Any) -> None:
    """Delete checkpoint folders of the run that Ray Train does not keep (uploads cut off by a lost worker)."""
    kept = {str(result.checkpoint.path).rstrip("/").rsplit("/", 1)[-1]}
    kept |= {str(c.path).rstrip("/").rsplit("/", 1)[-1] for c, _ in (result.best_checkpoints or [])}
    run = f"{Storage.work_prefix(ctx.kind, ctx.cache_key)}"
    for name in ctx.storage.list(run):  # Ray Train names them checkpoint_<date>_<time>
        if CHECKPOINT_DIR.match(name) and name not in kept:
            ctx.storage.delete(f"{run}/{name}", recursive=True)


def _training_error(ctx: StageContext, exc: BaseException, max_failures: int) -> str:

    inner = unwrap(exc)
    if isinstance(inner, CmflowError):
        return f"stage {ctx.stage!r}: {' '.join(str(inner).split())[:400]}"
    text = " ".join(str(exc).split())
    return (
        f"stage {ctx.stage!r}: Ray Train failed ({type(exc).__name__}: {text[:400]}) after up to {max_failures} "
        "restarts; fix the cause and resume the run (it continues from the last checkpoint)"
    )


# --------------------------------------------------------------------------------------------------
# inside the workers


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function: build, resume, train, checkpoint (every rank reports; rank 0 saves)."""
    import ray.train
    import torch

    job: TrainJob = config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    torch.set_num_threads(job.threads)
    run = build_run(job, StreamBatches(job.stream, rank, world, device), device)
    previous = ray.train.get_checkpoint()
    if previous is not None:
        with previous.as_directory() as folder:
            restore(run.state, load_checkpoint((Path(folder) / FILENAME).read_bytes()))
    forward = run.state.online
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            run.state.online, device_ids=[device.index] if device.type == "cuda" else None
        )

    params = job.params
    hooks = LoopHooks(
        on_log=lambda row: _on_log(job, rank, row, params["steps"]),
        on_checkpoint=lambda state: _periodic_report(job, state, rank),
        should_stop=_budget(params.get("time_budget_s"), world),
        reduce_loss=_mean_over_workers(world),
    )
    run_loop(
        run.state,
        run.make_step(forward),
        total_steps=params["steps"],
        images_per_step=params["batch_size"],
        log_every=params["log_every"],
        checkpoint_every=params["checkpoint_every"],
        hooks=hooks,
    )
    _report(job, run.state, rank, final=True)
    flush = getattr(job.reporter, "flush", None)
    if rank == 0 and flush is not None:
        flush(job.stage)


def _on_log(job: TrainJob, rank: int, row: dict[str, float], total: int) -> None:
    import math

    if not math.isfinite(row["loss"]):
        raise StageError(f"the loss became {row['loss']} at step {int(row['step'])}; lower lr")
    if rank == 0 and job.reporter is not None:
        step = int(row["step"])
        job.reporter(
            job.stage, {"metrics": {"step": step, "loss": row["loss"], "imgs_per_s": row["imgs_per_s"]}}
        )
        job.reporter(
            job.stage,
            {
                "done": step,
                "total": total,
                "message": f"loss {row['loss']:.4f}, {row['imgs_per_s']:.0f} img/s",
            },
        )


def _periodic_report(job: TrainJob, state: Any, rank: int) -> None:
    """A checkpoint every ``checkpoint_every`` steps, except at the last step (the final report follows)."""
    if state.step < job.params["steps"]:
        _report(job, state, rank, final=False)


def _report(job: TrainJob, state: Any, rank: int, *, final: bool) -> None:
    """Every rank calls ``ray.train.report``; rank 0 attaches the checkpoint and waits until it is registered."""
    import ray.train

    metrics = {"step": state.step, "final": final}
    if rank != 0:
        ray.train.report(metrics)
        return
    folder = tempfile.mkdtemp(prefix="cmflow-ckpt-")
    try:
        extra = {"done": final, "resumed_from_step": state.resumed_from_step, "method": job.method}
        (Path(folder) / FILENAME).write_bytes(checkpoint_bytes(state, **extra))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # durable before training goes on: Ray Train has uploaded, registered and snapshotted it
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    job.stream.record_position(state.step)


def _budget(time_budget_s: float | None, world: int) -> Any:
    if time_budget_s is None:
        return None

    def should_stop(state: Any) -> bool:
        over = state.train_seconds >= time_budget_s
        if world == 1:
            return over
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if over else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item() > 0)

    return should_stop


def _mean_over_workers(world: int) -> Any:
    if world == 1:
        return None

    def reduce(value: float) -> float:
        import torch
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total.item() / world)

    return reduce


@dataclass
class _Run:
    state: Any
    make_step: Any  # forward module -> StepFn


def build_run(job: TrainJob, data: Any, device: Any) -> _Run:
    """Networks, optimizer and step function of ``job`` on ``device``, drawing batches from ``data``."""
    import torch

    params = job.params
    torch.manual_seed(job.seed)  # the same initial weights on every rank and every rerun
    online = _initial_network(job).to(device)
    if not online.backbone.config.num_classes:
        data = _WithoutLabels(data)
    cfg = loop.OptimConfig(
        lr=params["lr"], optimizer=params["optimizer"], lr_warmup_steps=params["lr_warmup_steps"]
    )
    state = loop.TrainState(
        online=online,
        ema=loop.frozen_copy(online),
        optimizer=loop.make_optimizer(online.parameters(), cfg),
        target=loop.frozen_copy(online) if job.method in ("cd", "ct") else None,
    )
    ema_rate = params["ema_rate"]
    if job.method == "edm":
        edm_loss = losses.EDMLoss(params["p_mean"], params["p_std"])
        return _Run(state, lambda fwd: loop.teacher_step(edm_loss, data, cfg, ema_rate, forward=fwd))
    net = _perceptual(job, device)
    feature = params["distance"] == "feature"  # the net at native resolution, through feature_pair_loss
    common = {
        "distance": "l2" if feature else params["distance"],
        "weighting": params["weighting"],
        "lpips": None if feature else net,
        "huber_c": params.get("huber_c"),
    }

    def wrap(loss_fn: Any) -> Any:
        if not feature:
            return loss_fn

        return feature_pair_loss(loss_fn, net)

    if job.method == "cd":
        teacher = _teacher(job, device)
        loss_fn = wrap(losses.CDLoss(params["num_scales"], **common))
        return _Run(
            state,
            lambda fwd: loop.cd_step(
                loss_fn, teacher, data, cfg, mu=params["mu"], ema_rate=ema_rate, forward=fwd
            ),
        )
    curriculum = {
        "total_steps": params["steps"],
        "s0": params["s0"],
        "s1": params["s1"],
        "ema_rate": ema_rate,
    }
    if job.method == "ct":
        ct_loss = wrap(losses.CTLoss(**common))
        return _Run(
            state, lambda fwd: loop.ct_step(ct_loss, data, cfg, mu0=params["mu0"], forward=fwd, **curriculum)
        )
    ict_loss = wrap(losses.ICTLoss(p_mean=params["p_mean"], p_std=params["p_std"], **common))
    return _Run(state, lambda fwd: loop.ict_step(ict_loss, data, cfg, forward=fwd, **curriculum))


class _WithoutLabels:
    """A batch source whose labels are dropped (an unconditional network trained on a labelled dataset)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def batch(self, step: int) -> Any:
        from dataclasses import replace

        return replace(self.inner.batch(step), labels=None)


def _teacher(job: TrainJob, device: Any) -> Any:

    assert job.teacher is not None
    model = load_model(job.teacher.read_bytes("model.safetensors"), job.teacher.read_json("model.json"))
    return model.to(device).eval().requires_grad_(False)


def _initial_network(job: TrainJob) -> Any:
    """The EDM teacher or CT/iCT student: fresh from preset + unet; the CD student: the teacher's weights."""

    if job.method == "cd":
        return CMPrecond.from_edm(_teacher(job, "cpu")).requires_grad_(True)
    channels, resolution, _ = _shape(job)
    build = build_edm if job.method == "edm" else build_cm
    return build(job.params["preset"], job.params["unet"], channels, resolution, f"stages.{job.stage}.params")


def _shape(job: TrainJob) -> tuple[int, int, int]:
    info = job.stream.info
    return int(info["channels"]), int(info["resolution"]), int(info["resolution"])


def _perceptual(job: TrainJob, device: Any) -> Any:
    """The perceptual network of distance lpips / feature: the ``perceptual`` input, else ``lpips_uri``."""
    params = job.params
    if params["distance"] not in ("lpips", "feature"):
        return None

    if params.get("lpips_vgg16_uri"):
        options = params.get("storage_options", {})
        net = load_published_lpips(params["lpips_vgg16_uri"], params["lpips_lin_uri"], options)
    elif job.perceptual is not None:
        net = perceptual.load_perceptual(
            job.perceptual.read_bytes(perceptual.WEIGHTS), job.perceptual.read_json(perceptual.CONFIG)
        )
    else:
        net = load_perceptual_uri(params["lpips_uri"], params.get("storage_options", {}))
    return net.to(device)
