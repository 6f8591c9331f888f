"""``teacher``: train an EDM teacher (or load one from a URI); ``teacher_sample``: Heun samples from it."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import Field

from cmflow.errors import InputError, StageError
from cmflow.stage import Artifact, ParamsModel, StageContext, stage

Preset = Literal["tiny", "digits", "cifar10", "imagenet64", "adm-imagenet64", "adm-lsun256"]


class TeacherParams(ParamsModel):
    uri: str | None = Field(
        None,
        description="Load a pretrained teacher instead of training: a folder URI with model.json and "
        "model.safetensors (or a weights-only model.pt), or a released openai/consistency_models EDM "
        "checkpoint such as s3://models/edm_imagenet64_ema.pt.",
    )
    format: Literal["auto", "cmflow", "openai"] = Field(
        "auto",
        description="What `uri` holds: a cmflow model folder, a released openai .pt state dict (ADM backbone, "
        "c_noise = 250 ln sigma; the architecture is `preset` if it is an adm-* preset, else detected), or "
        "auto: a single file is openai, a folder cmflow.",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for `uri`.")
    preset: Preset = Field(
        "digits",
        description="Backbone preset: cmflow UNet (cmflow.models.unet.UNET_PRESETS) or openai ADM "
        "(cmflow.models.adm.ADM_PRESETS: adm-imagenet64, adm-lsun256).",
    )
    unet: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the preset's UNetConfig (or ADMConfig) fields."
    )
    steps: int = Field(2600, ge=0, description="Optimizer steps.")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "radam"] = "adam"
    lr_warmup_steps: int = Field(100, ge=0)
    ema_rate: float = Field(0.999, ge=0, le=1, description="EMA rate, warmed up as min(rate, (1+n)/(10+n)).")
    p_mean: float = Field(-1.2, description="ln sigma ~ N(p_mean, p_std^2) (EDM).")
    p_std: float = Field(1.2, gt=0)
    seed: int = Field(0, ge=0, description="Combined with the pipeline seed.")
    checkpoint_every: int = Field(500, ge=0, description="Steps between checkpoints (0: none).")
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop early after this much training time (makes the output time-dependent)."
    )
    grid_samples: int = Field(64, ge=0, le=1024, description="Samples in samples.png (0: no grid).")
    log_every: int = Field(50, ge=1, description="Steps between metric rows (not part of the cache key).")


class TeacherSampleParams(ParamsModel):
    num_samples: int = Field(5000, ge=1)
    num_steps: int = Field(18, ge=2, description="Heun steps; NFE = 2 num_steps - 1 (18 -> 35).")
    seed_start: int = Field(0, ge=0, description="Sample i uses seed seed_start + i.")
    batch_size: int = Field(500, ge=1)
    num_tasks: int = Field(1, ge=1, le=1024, description="Ray tasks to fan out over (by seed range).")
    class_labels: int | Literal["uniform"] | None = Field(
        None, description="Conditional teachers: one class for all samples, or 'uniform' (drawn per seed)."
    )


@stage(
    "teacher",
    params=TeacherParams,
    version="1",
    inputs=("data",),
    cache_ignore=("log_every",),
)
def teacher(params: TeacherParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Train an EDM teacher on ``data`` (EMA with warm-up, checkpoints under the work folder, resumed on a
    rerun) or load it from ``uri``. Writes ``model.safetensors`` + ``model.json`` (kind "edm", the EMA
    weights), ``raw.safetensors`` (the raw weights; trained teachers only) and ``samples.png``.

    Examples:
        teacher: {kind: teacher, inputs: {data: data}, params: {preset: digits, steps: 2600}}
        teacher: {kind: teacher, inputs: {data: data}, params: {uri: s3://models/edm-cifar10}}
        teacher: {kind: teacher, inputs: {data: data},
                  params: {uri: s3://models/edm_imagenet64_ema.pt, format: openai, preset: adm-imagenet64}}
    """
    import torch

    from cmflow.data.shards import read_dataset
    from cmflow.interop import load_teacher_uri
    from cmflow.models.adm import ADM_PRESETS
    from cmflow.models.io import save_model, weights_bytes
    from cmflow.training.builders import check_image_shape, count_params

    torch.set_num_threads(ctx.num_threads)
    images, labels, info = read_dataset(inputs["data"].read_bytes)
    if params.uri:
        adm_preset = params.preset if params.preset in ADM_PRESETS else None
        model, config = load_teacher_uri(
            params.uri, params.storage_options, params.format, adm_preset, params.unet if adm_preset else {}
        )
        check_image_shape(config, info["channels"], info["resolution"], params.uri)
        save_model(model, ctx.out_dir, source="uri", dataset_digest=info["digest"])
        _teacher_grid(model, params, config, ctx)
        return {"params_count": count_params(model), "final_loss": None, "steps": 0, "loaded": True}

    state = _train_teacher(params, images, labels, info, ctx)
    ema = state.ema.eval()
    save_model(ema, ctx.out_dir, source="trained", steps=state.step, dataset_digest=info["digest"])
    (ctx.out_dir / "raw.safetensors").write_bytes(weights_bytes(state.online))
    from cmflow.models.io import model_config

    _teacher_grid(ema, params, model_config(ema), ctx)
    from cmflow.training.loop import final_loss

    return {"params_count": count_params(ema), "final_loss": final_loss(state), "steps": state.step}


def _train_teacher(
    params: TeacherParams, images: Any, labels: Any, info: dict[str, Any], ctx: StageContext
) -> Any:
    import torch

    from cmflow.diffusion.losses import EDMLoss
    from cmflow.diffusion.rng import mix_seed
    from cmflow.training.builders import build_edm
    from cmflow.training.loop import (
        DataSampler,
        LoopHooks,
        OptimConfig,
        TrainState,
        frozen_copy,
        make_optimizer,
        run_loop,
        teacher_step,
    )

    device = torch.device(ctx.device)
    torch.manual_seed(mix_seed(params.seed, ctx.seed))  # the initial weights (and Fourier frequencies)
    net = build_edm(
        params.preset, params.unet, info["channels"], info["resolution"], f"stages.{ctx.stage}.params"
    )
    num_classes = net.backbone.config.num_classes
    labels = _check_labels(num_classes, labels, info, ctx.stage)
    net = net.to(device)
    cfg = OptimConfig(lr=params.lr, optimizer=params.optimizer, lr_warmup_steps=params.lr_warmup_steps)
    state = TrainState(net, frozen_copy(net), make_optimizer(net.parameters(), cfg))
    store = _WorkCheckpoints(ctx)
    store.resume(state)
    data = DataSampler(
        torch.from_numpy(images),
        torch.from_numpy(labels) if labels is not None else None,
        params.batch_size,
        seed=mix_seed(params.seed, ctx.seed),
        device=device,
    )
    step = teacher_step(EDMLoss(params.p_mean, params.p_std), data, cfg, params.ema_rate)
    hooks = LoopHooks(
        on_log=lambda row: _log(ctx, row, params.steps, "teacher"),
        on_checkpoint=store.save,
        should_stop=_budget(params.time_budget_s),
    )
    started = time.time()
    run_loop(
        state,
        step,
        total_steps=params.steps,
        images_per_step=params.batch_size,
        log_every=params.log_every,
        checkpoint_every=params.checkpoint_every,
        hooks=hooks,
    )
    if state.step > state.resumed_from_step and params.checkpoint_every > 0:
        store.save(state)
    ctx.progress(state.step, params.steps, message=f"trained in {time.time() - started:.0f} s")
    return state


def _check_labels(num_classes: int, labels: Any, info: dict[str, Any], stage_name: str) -> Any:
    if num_classes == 0:
        return None
    if labels is None:
        raise InputError(
            f"stage {stage_name!r}: the UNet is class-conditional ({num_classes} classes) but the dataset has no "
            "labels; set use_labels: true in prepare_data or unet.num_classes: 0"
        )
    if info.get("num_classes", 0) > num_classes:
        raise InputError(
            f"stage {stage_name!r}: the dataset has {info['num_classes']} classes but the UNet only "
            f"{num_classes}; set unet.num_classes: {info['num_classes']}"
        )
    return labels


def _budget(time_budget_s: float | None) -> Any:
    if time_budget_s is None:
        return None
    return lambda state: state.train_seconds >= time_budget_s


def _log(ctx: StageContext, row: dict[str, float], total: int, what: str) -> None:
    if not math.isfinite(row["loss"]):
        raise StageError(
            f"stage {ctx.stage!r}: the {what} loss became {row['loss']} at step {int(row['step'])}; lower lr"
        )
    step = int(row["step"])
    ctx.log_metrics(step, loss=row["loss"])
    ctx.log_timing(step, imgs_per_s=row["imgs_per_s"])
    ctx.progress(step, total, message=f"loss {row['loss']:.4f}, {row['imgs_per_s']:.0f} img/s")


class _WorkCheckpoints:
    """The latest checkpoint of a local (non-Ray-Train) run, kept under the stage's durable work folder."""

    def __init__(self, ctx: StageContext) -> None:
        from cmflow.storage import Storage

        self.ctx = ctx
        self.key = f"{Storage.work_prefix(ctx.kind, ctx.cache_key)}/checkpoint.pt"

    def resume(self, state: Any) -> None:
        from cmflow.training.checkpoint import load_checkpoint, restore

        try:
            data = self.ctx.storage.read_bytes(self.key)
        except FileNotFoundError:
            return
        try:
            restore(state, load_checkpoint(data))
        except (ValueError, RuntimeError, KeyError) as exc:  # unreadable or from another architecture
            self.ctx.progress(0, 1, message=f"ignoring the old checkpoint ({str(exc)[:80]})")
            return
        for row in state.metrics:
            self.ctx.log_metrics(int(row["step"]), loss=row["loss"])
        self.ctx.progress(state.step, max(state.step, 1), message=f"resumed from step {state.step}")

    def save(self, state: Any) -> None:
        from cmflow.training.checkpoint import checkpoint_bytes

        self.ctx.storage.write_bytes(self.key, checkpoint_bytes(state))


def _teacher_grid(model: Any, params: TeacherParams, config: dict[str, Any], ctx: StageContext) -> None:
    if params.grid_samples == 0:
        return
    from cmflow.data.images import save_grid
    from cmflow.diffusion.generate import sample_range

    image = config["image"]
    images, _ = sample_range(
        model.eval(),
        0,
        params.grid_samples,
        256,
        shape=(image["channels"], image["resolution"], image["resolution"]),
        method="edm",
        num_steps=18,
        num_classes=config.get("num_classes", 0),
    )
    save_grid(images, ctx.out_dir / "samples.png")


# --------------------------------------------------------------------------------------------------
# teacher_sample


def _sample_seed_ranges(
    weights: bytes,
    config: dict[str, Any],
    ranges: list[tuple[int, int]],
    kwargs: dict[str, Any],
    num_threads: int,
    on_batch: Any = None,
) -> tuple[Any, Any]:
    """Sample the given seed ranges (one batch each) from a model given as bytes; runs in a Ray task too."""
    import numpy as np
    import torch

    from cmflow.diffusion.generate import sample_images
    from cmflow.models.io import load_model

    torch.set_num_threads(num_threads)
    device = "cuda" if kwargs.pop("use_cuda", False) and torch.cuda.is_available() else "cpu"
    model = load_model(weights, config).to(device)
    parts = []
    for a, b in ranges:
        parts.append(sample_images(model, range(a, b), **kwargs))
        if on_batch is not None:
            on_batch(b - a)
    images = np.concatenate([p[0].numpy() for p in parts])
    labels = np.concatenate([p[1].numpy() for p in parts]) if parts[0][1] is not None else None
    return images, labels


@stage(
    "teacher_sample",
    params=TeacherSampleParams,
    version="1",
    inputs=("teacher",),
    optional_inputs=("data",),
)
def teacher_sample(
    params: TeacherSampleParams, inputs: dict[str, Artifact], ctx: StageContext
) -> dict[str, Any]:
    """Heun-sample ``num_samples`` images (seeds ``seed_start``...) from the teacher, fanned out over
    ``num_tasks`` Ray tasks by seed range; writes ``images.npy`` (+ ``labels.npy``) and ``dataset.json`` in the
    prepare_data format, so it can replace the dataset as distillation input (data-free CD).

    Examples:
        teacher_samples: {kind: teacher_sample, inputs: {teacher: teacher}, params: {num_samples: 5000}}
    """
    import numpy as np

    from cmflow.data.shards import dataset_meta, write_dataset
    from cmflow.diffusion.generate import batch_ranges

    config = inputs["teacher"].read_json("model.json")
    if config.get("kind") != "edm":
        raise InputError(
            f"stage {ctx.stage!r}: input 'teacher' holds a {config.get('kind')!r} model, not an EDM one"
        )
    weights = inputs["teacher"].read_bytes("model.safetensors")
    image, num_classes = config["image"], int(config.get("num_classes", 0))
    if not num_classes and params.class_labels is not None:
        raise InputError(
            f"stage {ctx.stage!r}: the teacher is unconditional, so it takes no class labels; remove class_labels"
        )
    if num_classes and params.class_labels is None:
        raise InputError(
            f"stage {ctx.stage!r}: the teacher is class-conditional; set class_labels: uniform (or a class index)"
        )
    if "data" in inputs:
        data_info = inputs["data"].read_json("dataset.json")
        if (data_info["channels"], data_info["resolution"]) != (image["channels"], image["resolution"]):
            raise InputError(f"stage {ctx.stage!r}: the teacher's image shape differs from input 'data'")
    kwargs = {
        "shape": (image["channels"], image["resolution"], image["resolution"]),
        "method": "edm",
        "num_steps": params.num_steps,
        "num_classes": num_classes,
        "class_labels": params.class_labels if isinstance(params.class_labels, int) else None,
        "use_cuda": ctx.device.startswith("cuda"),
    }
    ranges = [
        (r.start, r.stop) for r in batch_ranges(params.seed_start, params.num_samples, params.batch_size)
    ]
    groups = [g for g in np.array_split(np.arange(len(ranges)), min(params.num_tasks, len(ranges))) if len(g)]
    chunks = [[ranges[i] for i in group] for group in groups]
    parts = _run_chunks(weights, config, chunks, kwargs, ctx)
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]) if parts[0][1] is not None else None
    info = write_dataset(
        ctx.out_dir,
        images,
        labels,
        source="teacher_sample",
        num_classes=num_classes,
        extra={
            "teacher_digest": inputs["teacher"].digest,
            "num_steps": params.num_steps,
            "nfe": 2 * params.num_steps - 1,
            "seed_start": params.seed_start,
        },
    )
    return {**dataset_meta(info), "nfe": 2 * params.num_steps - 1}


def _run_chunks(
    weights: bytes,
    config: dict[str, Any],
    chunks: list[list[tuple[int, int]]],
    kwargs: dict[str, Any],
    ctx: StageContext,
) -> list[tuple[Any, Any]]:
    """Each chunk in its own Ray task when Ray is up and there is more than one; else here, in order."""
    total = sum(b - a for chunk in chunks for a, b in chunk)
    import ray

    if len(chunks) == 1 or not ray.is_initialized():
        done = [0]

        def on_batch(n: int) -> None:
            done[0] += n
            ctx.progress(done[0], total, message=f"{done[0]}/{total} samples")

        every = [seed_range for chunk in chunks for seed_range in chunk]
        return [_sample_seed_ranges(weights, config, every, dict(kwargs), ctx.num_threads, on_batch)]
    remote = ray.remote(_sample_seed_ranges).options(
        num_cpus=ctx.resources.cpus, num_gpus=ctx.resources.gpus, name=f"cmflow:{ctx.stage}:sample"
    )
    weights_ref = ray.put(weights)
    refs = [remote.remote(weights_ref, config, chunk, dict(kwargs), ctx.num_threads) for chunk in chunks]
    sizes = {ref: sum(b - a for a, b in chunk) for ref, chunk in zip(refs, chunks, strict=True)}
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += sum(sizes[r] for r in ready)
        ctx.progress(done, total, message=f"{done}/{total} samples ({len(pending)} tasks left)")
    return ray.get(refs)
