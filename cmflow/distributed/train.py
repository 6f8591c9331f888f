"""Consistency training under Ray Train: ``TorchTrainer`` workers run the loops of :mod:`cmflow.training.loop`.

:func:`fit` starts ``resources.workers`` workers with ``ScalingConfig(num_workers, use_gpu,
resources_per_worker={"CPU", "GPU", **custom})``. The run lives at ``RunConfig(storage_path=<root>/work/<kind>,
name=<cache key>)``, i.e. under the stage's durable work folder, so:

* every ``checkpoint_every`` steps rank 0 reports a checkpoint (online, target, EMA, optimizer, step, metric
  rows, RNG) through ``ray.train.report`` (every rank calls it);
* a lost worker makes Ray Train restart the group (``FailureConfig(max_failures)``) and the workers resume
  from ``ray.train.get_checkpoint()``;
* a rerun with the same cache key (a resumed pipeline) finds the run's snapshot in storage and resumes from
  its last checkpoint (the Train V2 replacement for ``Trainer.restore``).

The global batch is split evenly over the workers (each draws its own minibatch with a per-rank RNG); the
gradients are averaged by DDP. Rank 0 sends progress and metric rows to the live display through the
stage's reporter (a picklable wrapper of the ProgressHub actor handle).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cmflow.errors import InputError, StageError
from cmflow.stage import Artifact, StageContext

Method = Literal["cd", "ct", "ict"]


@dataclass
class TrainJob:
    """Everything a worker needs, as references (artifacts are manifests + a storage that pickles small)."""

    method: Method
    params: dict[str, Any]  # the stage params (model_dump)
    seed: int
    stage: str
    data: Artifact
    teacher: Artifact | None = None
    perceptual: Artifact | None = None  # a perceptual_net output, for distance lpips / feature
    threads: int = 1
    use_gpu: bool = False
    reporter: Any = None


def run_config_paths(ctx: StageContext) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) of the stage's Ray Train runs: ``<root>/work/<kind>``."""
    from cmflow.storage import Storage

    prefix = Storage.work_prefix(ctx.kind, ctx.cache_key).rsplit("/", 1)[0]
    storage = ctx.storage
    if storage.is_local:
        path = Path(storage.path(prefix))
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    import pyarrow.fs

    return storage.path(prefix), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs))


def fit(job: TrainJob, ctx: StageContext, *, max_failures: int = 3) -> dict[str, Any]:
    """Run the job on ``ctx.resources.workers`` Ray Train workers; returns the final checkpoint's contents."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from cmflow.training.checkpoint import FILENAME, load_checkpoint

    resources = ctx.resources
    per_worker = {
        "CPU": resources.cpus,
        **({"GPU": resources.gpus} if resources.gpus else {}),
        **resources.custom,
    }
    storage_path, filesystem = run_config_paths(ctx)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=resources.gpus > 0, resources_per_worker=per_worker
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
    return content


def _training_error(ctx: StageContext, exc: BaseException, max_failures: int) -> str:
    text = " ".join(str(exc).split())
    for known in (InputError, StageError):
        if known.__name__ in text:
            inner = text.split(f"{known.__name__}:", 1)[-1].strip()
            return f"stage {ctx.stage!r}: {inner[:400]}"
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
    _write_pid(job, rank)
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    torch.set_num_threads(job.threads)
    run = build_run(job, device, rank, world)
    previous = ray.train.get_checkpoint()
    if previous is not None:
        from cmflow.training.checkpoint import FILENAME, load_checkpoint, restore

        with previous.as_directory() as folder:
            restore(run.state, load_checkpoint((Path(folder) / FILENAME).read_bytes()))
    forward = run.state.online
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            run.state.online, device_ids=[device.index] if device.type == "cuda" else None
        )
    from cmflow.training.loop import LoopHooks, run_loop

    params = job.params
    step_fn = run.make_step(forward)
    hooks = LoopHooks(
        on_log=lambda row: _on_log(job, rank, row, params["steps"]),
        on_checkpoint=lambda state: _periodic_report(job, state, rank),
        should_stop=_budget(params.get("time_budget_s"), world),
        reduce_loss=_mean_over_workers(world),
    )
    run_loop(
        run.state,
        step_fn,
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


def _write_pid(job: TrainJob, rank: int) -> None:
    pid_dir = job.params.get("pid_dir")
    if pid_dir:
        os.makedirs(pid_dir, exist_ok=True)
        Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))


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
    """Every rank calls ``ray.train.report``; rank 0 attaches the checkpoint."""
    import ray.train

    from cmflow.training.checkpoint import FILENAME, checkpoint_bytes

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
    pid_dir = job.params.get("pid_dir")
    if pid_dir:
        with open(Path(pid_dir, "checkpoints.txt"), "a") as handle:
            handle.write(f"{state.step}\n")


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


def build_run(job: TrainJob, device: Any, rank: int, world: int) -> _Run:
    """Networks, optimizer, data sampler and step function of ``job`` on ``device`` (rank ``rank`` of ``world``)."""
    import torch

    from cmflow.data.shards import read_dataset
    from cmflow.diffusion import losses
    from cmflow.training import loop

    params = job.params
    if params["batch_size"] % world:
        raise InputError(f"batch_size {params['batch_size']} is not divisible by the {world} workers")
    images, labels, _info = read_dataset(job.data.read_bytes)
    torch.manual_seed(job.seed)  # same initial weights on every rank and every rerun
    online = _initial_network(job, images).to(device)
    num_classes = online.backbone.config.num_classes
    if num_classes and labels is None:
        raise InputError("the network is class-conditional but the dataset has no labels")
    cfg = loop.OptimConfig(
        lr=params["lr"], optimizer=params["optimizer"], lr_warmup_steps=params["lr_warmup_steps"]
    )
    state = loop.TrainState(
        online=online,
        ema=loop.frozen_copy(online),
        optimizer=loop.make_optimizer(online.parameters(), cfg),
        target=loop.frozen_copy(online) if job.method in ("cd", "ct") else None,
    )
    data = loop.DataSampler(
        torch.from_numpy(images),
        torch.from_numpy(labels) if (labels is not None and num_classes) else None,
        params["batch_size"] // world,
        seed=job.seed,
        rank=rank,
        device=device,
    )
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
        from cmflow.training.perceptual import feature_pair_loss

        return feature_pair_loss(loss_fn, net)

    ema_rate = params["ema_rate"]
    if job.method == "cd":
        teacher = _teacher(job, device)
        loss_fn = wrap(losses.CDLoss(params["num_scales"], **common))
        return _Run(
            state,
            lambda fwd: loop.cd_step(
                loss_fn, teacher, data, cfg, mu=params["mu"], ema_rate=ema_rate, forward=fwd
            ),
        )
    if job.method == "ct":
        ct_loss = wrap(losses.CTLoss(**common))
        return _Run(
            state,
            lambda fwd: loop.ct_step(
                ct_loss,
                data,
                cfg,
                total_steps=params["steps"],
                s0=params["s0"],
                s1=params["s1"],
                mu0=params["mu0"],
                ema_rate=ema_rate,
                forward=fwd,
            ),
        )
    ict_loss = wrap(losses.ICTLoss(p_mean=params["p_mean"], p_std=params["p_std"], **common))
    return _Run(
        state,
        lambda fwd: loop.ict_step(
            ict_loss,
            data,
            cfg,
            total_steps=params["steps"],
            s0=params["s0"],
            s1=params["s1"],
            ema_rate=ema_rate,
            forward=fwd,
        ),
    )


def _teacher(job: TrainJob, device: Any) -> Any:
    from cmflow.models.io import load_model

    assert job.teacher is not None
    model = load_model(job.teacher.read_bytes("model.safetensors"), job.teacher.read_json("model.json"))
    return model.to(device).eval().requires_grad_(False)


def _initial_network(job: TrainJob, images: Any) -> Any:
    """CD: the student starts as the teacher's (EMA) weights; CT/iCT: a fresh network from preset + unet."""
    from cmflow.models.precond import CMPrecond

    if job.method == "cd":
        return CMPrecond.from_edm(_teacher(job, "cpu")).requires_grad_(True)
    from cmflow.training.builders import build_cm

    return build_cm(
        job.params["preset"],
        job.params["unet"],
        images.shape[1],
        images.shape[2],
        f"stages.{job.stage}.params",
    )


def _perceptual(job: TrainJob, device: Any) -> Any:
    """The perceptual network of distance lpips / feature: the ``perceptual`` input, else ``lpips_uri``."""
    params = job.params
    if params["distance"] not in ("lpips", "feature"):
        return None
    from cmflow.training import perceptual

    if params.get("lpips_vgg16_uri"):
        from cmflow.loaders import load_published_lpips

        options = params.get("storage_options", {})
        net = load_published_lpips(params["lpips_vgg16_uri"], params["lpips_lin_uri"], options)
    elif job.perceptual is not None:
        net = perceptual.load_perceptual(
            job.perceptual.read_bytes(perceptual.WEIGHTS), job.perceptual.read_json(perceptual.CONFIG)
        )
    else:
        from cmflow.loaders import load_perceptual_uri

        net = load_perceptual_uri(params["lpips_uri"], params.get("storage_options", {}))
    return net.to(device)
