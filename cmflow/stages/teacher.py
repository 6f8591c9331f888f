"""``teacher``: train an EDM teacher on Ray Train (or load one from a URI); ``teacher_sample``: Heun samples."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cmflow.errors import InputError
from cmflow.stage import Artifact, ParamsModel, StageContext, stage
from cmflow.stages.common import RUN_IGNORED, Preset, RunParams, log_rows, save_grids


class TeacherParams(RunParams):
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
    lr: float = Field(1e-3, gt=0)
    lr_warmup_steps: int = Field(100, ge=0)
    p_mean: float = Field(-1.2, description="ln sigma ~ N(p_mean, p_std^2) (EDM).")
    p_std: float = Field(1.2, gt=0)


class TeacherSampleParams(ParamsModel):
    num_samples: int = Field(5000, ge=1)
    num_steps: int = Field(18, ge=2, description="Heun steps; NFE = 2 num_steps - 1 (18 -> 35).")
    seed_start: int = Field(0, ge=0, description="Sample i uses seed seed_start + i.")
    batch_size: int = Field(500, ge=1, description="Samples per network call (results do not depend on it).")
    num_tasks: int = Field(
        1, ge=1, le=1024, description="Ray tasks sampling at once, each with the stage's resources."
    )
    class_labels: int | Literal["uniform"] | None = Field(
        None, description="Conditional teachers: one class for all samples, or 'uniform' (drawn per seed)."
    )


@stage(
    "teacher",
    params=TeacherParams,
    version="2",
    inputs=("data",),
    cache_ignore=RUN_IGNORED,
    distributed=True,
)
def teacher(params: TeacherParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Train an EDM teacher on ``data`` with ``resources.workers`` Ray Train workers (DDP; EMA with warm-up;
    checkpoints under the work folder; a lost worker or a rerun resumes), or load it from ``uri``. Writes
    ``model.safetensors`` + ``model.json`` (kind "edm", the EMA weights), ``raw.safetensors`` (the raw
    weights; trained teachers only), ``metrics.jsonl`` and ``samples.png``.

    Examples:
        teacher: {kind: teacher, inputs: {data: data}, params: {preset: digits, steps: 2600}}
        teacher: {kind: teacher, inputs: {data: data}, params: {preset: cifar10}, resources: {workers: 8, gpus: 1}}
        teacher: {kind: teacher, inputs: {data: data}, params: {uri: s3://models/edm-cifar10}}
        teacher: {kind: teacher, inputs: {data: data},
                  params: {uri: s3://models/edm_imagenet64_ema.pt, format: openai, preset: adm-imagenet64}}
    """
    from cmflow.data.shards import DatasetInfo
    from cmflow.models.io import save_model, weights_bytes

    info = DatasetInfo.parse(inputs["data"].read_bytes("dataset.json"))
    channels, resolution, _ = info.shape
    grids = {"samples.png": {"method": "edm", "num_steps": 18}}
    if params.uri:
        from cmflow.interop import load_teacher_uri
        from cmflow.models.adm import ADM_PRESETS
        from cmflow.training.builders import check_image_shape, count_params

        adm_preset = params.preset if params.preset in ADM_PRESETS else None
        model, config = load_teacher_uri(
            params.uri, params.storage_options, params.format, adm_preset, params.unet if adm_preset else {}
        )
        check_image_shape(config, channels, resolution, params.uri)
        config = save_model(model, ctx.out_dir, source="uri", dataset_digest=info.digest)
        save_grids((ctx.out_dir / "model.safetensors").read_bytes(), config, grids, params.grid_samples, ctx)
        return {"params_count": count_params(model), "final_loss": None, "steps": 0, "loaded": True}

    from cmflow.diffusion.rng import mix_seed
    from cmflow.distributed.train import TrainJob, fit
    from cmflow.training.builders import build_edm, count_params

    net = build_edm(params.preset, params.unet, channels, resolution, f"stages.{ctx.stage}.params")
    num_classes = net.backbone.config.num_classes
    _check_labels(num_classes, info, ctx.stage)
    job = TrainJob(
        method="edm",
        params=params.model_dump(mode="json"),
        seed=mix_seed(params.seed, ctx.seed),
        stage=ctx.stage,
        data=inputs["data"],
        num_classes=num_classes,
        threads=ctx.num_threads,
        use_gpu=ctx.resources.gpus > 0,
        reporter=ctx.reporter,
    )
    ctx.progress(0, params.steps, message=f"starting {ctx.resources.workers} Ray Train worker(s)")
    content = fit(job, ctx, max_failures=params.max_failures)
    log_rows(ctx, content["metrics"])
    ema, online = build_edm(params.preset, params.unet, channels, resolution, ""), net
    ema.load_state_dict(content["ema"])
    online.load_state_dict(content["online"])
    steps = int(content["step"])
    config = save_model(ema.eval(), ctx.out_dir, source="trained", steps=steps, dataset_digest=info.digest)
    (ctx.out_dir / "raw.safetensors").write_bytes(weights_bytes(online))
    save_grids((ctx.out_dir / "model.safetensors").read_bytes(), config, grids, params.grid_samples, ctx)
    rows = content["metrics"]
    return {
        "params_count": count_params(ema),
        "final_loss": float(rows[-1]["loss"]) if rows else None,
        "steps": steps,
        "resumed_from_step": int(content.get("resumed_from_step", 0)),
    }


def _check_labels(num_classes: int, info: Any, stage_name: str) -> None:
    if num_classes == 0:
        return
    if not info.has_labels:
        raise InputError(
            f"stage {stage_name!r}: the UNet is class-conditional ({num_classes} classes) but the dataset has no "
            "labels; set use_labels: true in prepare_data or unet.num_classes: 0"
        )
    if info.num_classes > num_classes:
        raise InputError(
            f"stage {stage_name!r}: the dataset has {info.num_classes} classes but the UNet only "
            f"{num_classes}; set unet.num_classes: {info.num_classes}"
        )


# --------------------------------------------------------------------------------------------------
# teacher_sample

#: samples per task item: small enough that a finished item can be written while others still run
ITEM_BATCHES = 4


def _sample_item(item: tuple[Any, dict[str, Any], list[tuple[int, int]], dict[str, Any]]) -> tuple[Any, Any]:
    """Inside a task: the images (and labels) of consecutive seed ranges, one network batch each."""
    import numpy as np
    import ray

    from cmflow.diffusion.generate import sample_images
    from cmflow.distributed.tasks import task_device
    from cmflow.models.io import load_model

    weights, config, ranges, kwargs = item
    data = ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights
    model = load_model(data, config).to(task_device(kwargs.pop("gpus", 0)))
    parts = [sample_images(model, range(a, b), **kwargs) for a, b in ranges]
    images = np.concatenate([p[0].numpy() for p in parts])
    labels = np.concatenate([p[1].numpy() for p in parts]) if parts[0][1] is not None else None
    return images, labels


@stage(
    "teacher_sample",
    params=TeacherSampleParams,
    version="2",
    inputs=("teacher",),
    optional_inputs=("data",),
    cache_ignore=("batch_size", "num_tasks"),
    distributed=True,
)
def teacher_sample(
    params: TeacherSampleParams, inputs: dict[str, Artifact], ctx: StageContext
) -> dict[str, Any]:
    """Heun-sample ``num_samples`` images (seeds ``seed_start``...) from the teacher in Ray tasks with the
    stage's resources (``num_tasks`` at once), and write them, in seed order as they arrive, as a sharded
    dataset (the prepare_data format), so they can replace the dataset as distillation input (data-free
    CD). Sample seeds are per sample, so the images do not depend on ``num_tasks``, ``batch_size`` or the
    device.

    Examples:
        teacher_samples: {kind: teacher_sample, inputs: {teacher: teacher}, params: {num_samples: 5000}}
    """
    import ray

    from cmflow.data.shards import ShardWriter, dataset_meta
    from cmflow.diffusion.generate import batch_ranges
    from cmflow.distributed.tasks import iter_tasks

    config = inputs["teacher"].read_json("model.json")
    if config.get("kind") != "edm":
        raise InputError(
            f"stage {ctx.stage!r}: input 'teacher' holds a {config.get('kind')!r} model, not an EDM one"
        )
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
    weights = inputs["teacher"].read_bytes("model.safetensors")
    ref = ray.put(weights) if ray.is_initialized() else weights
    kwargs = {
        "shape": (image["channels"], image["resolution"], image["resolution"]),
        "method": "edm",
        "num_steps": params.num_steps,
        "num_classes": num_classes,
        "class_labels": params.class_labels if isinstance(params.class_labels, int) else None,
        "gpus": ctx.resources.gpus,
    }
    ranges = [
        (r.start, r.stop) for r in batch_ranges(params.seed_start, params.num_samples, params.batch_size)
    ]
    items = [
        (ref, config, ranges[i : i + ITEM_BATCHES], dict(kwargs)) for i in range(0, len(ranges), ITEM_BATCHES)
    ]
    writer = ShardWriter(ctx.out_dir, has_labels=bool(num_classes))
    done = 0
    for images, labels in iter_tasks(
        _sample_item, items, ctx.resources, name=f"cmflow:{ctx.stage}:sample", max_in_flight=params.num_tasks
    ):
        writer.add(images, labels)
        done += images.shape[0]
        ctx.progress(done, params.num_samples, message=f"{done}/{params.num_samples} samples")
    info = writer.close(
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
