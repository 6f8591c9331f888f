"""What the training stages (``teacher``, ``distill``, ``train_cm``) share: run params and sample grids."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cmflow.stage import ParamsModel, StageContext

Preset = Literal["tiny", "digits", "cifar10", "imagenet64", "adm-imagenet64", "adm-lsun256"]
#: params that change how a run is executed or watched, not what it computes (left out of cache keys)
RUN_IGNORED = ("log_every", "max_failures")


class RunParams(ParamsModel):
    """A training run on ``resources.workers`` Ray Train workers, streaming its dataset shard by shard."""

    steps: int = Field(2000, ge=0, description="Optimizer steps.")
    batch_size: int = Field(128, ge=1, description="Global batch, split evenly over the lanes (and workers).")
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal["adam", "radam"] = "adam"
    lr_warmup_steps: int = Field(0, ge=0)
    ema_rate: float = Field(
        0.999, ge=0, le=1, description="Evaluation EMA, warmed up as min(rate, (1+n)/(10+n))."
    )
    seed: int = Field(0, ge=0, description="Combined with the pipeline seed.")
    lanes: int | None = Field(
        None,
        ge=1,
        description="Sample-order partitions (default: resources.workers). The batches depend only on the seed "
        "and lanes, so any worker count that divides lanes trains on exactly the same batches.",
    )
    shuffle_window: int | None = Field(
        None, ge=1, description="Images shuffled together while streaming (default: one shard's worth)."
    )
    checkpoint_every: int = Field(500, ge=0, description="Steps between checkpoints (0: only the final one).")
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop early after this much training time (makes the output time-dependent)."
    )
    grid_samples: int = Field(64, ge=0, le=1024, description="Samples per grid PNG (0: no grids).")
    log_every: int = Field(50, ge=1, description="Steps between loss rows (not part of the cache key).")
    max_failures: int = Field(
        3, ge=0, description="Ray Train restarts after lost workers (not in the cache key)."
    )


def log_rows(ctx: StageContext, rows: list[dict[str, float]]) -> None:
    """A finished run's rows: losses into the artifact's metrics, throughput into the run record only."""
    for row in rows:
        ctx.log_metrics(int(row["step"]), loss=row["loss"])
        ctx.log_timing(int(row["step"]), imgs_per_s=row["imgs_per_s"])


def _grid(item: tuple[Any, dict[str, Any], dict[str, Any], int]) -> Any:
    """Inside a task: sample ``count`` images (seeds 0..) of the model in ``weights`` / ``config``."""
    from cmflow.diffusion.generate import sample_range
    from cmflow.distributed.tasks import task_device
    from cmflow.models.io import load_model

    weights, config, sampling, count = item
    import ray

    data = ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights
    model = load_model(data, config).to(task_device(sampling.pop("gpus", 0)))
    image = config["image"]
    images, _ = sample_range(
        model,
        0,
        count,
        256,
        shape=(image["channels"], image["resolution"], image["resolution"]),
        num_classes=int(config.get("num_classes", 0) or 0),
        **sampling,
    )
    return images


def save_grids(
    weights: bytes, config: dict[str, Any], grids: dict[str, dict[str, Any]], count: int, ctx: StageContext
) -> None:
    """Write one PNG grid per entry of ``grids`` (file name -> sampling settings), sampled in Ray tasks with
    the stage's resources (a GPU when it has one) through the one sampling path."""
    if count == 0 or not grids:
        return
    import ray

    from cmflow.data.images import save_grid
    from cmflow.distributed.tasks import run_tasks

    ref = ray.put(weights) if ray.is_initialized() else weights
    items = [(ref, config, {**sampling, "gpus": ctx.resources.gpus}, count) for sampling in grids.values()]
    for name, images in zip(
        grids, run_tasks(_grid, items, ctx.resources, name=f"cmflow:{ctx.stage}:grid"), strict=True
    ):
        save_grid(images, ctx.out_dir / name)
