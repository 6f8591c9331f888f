"""``distill`` (consistency distillation, CD) and ``train_cm`` (consistency training, CT / iCT) on Ray Train.

Both run ``resources.workers`` Ray Train workers (:mod:`cmflow.distributed.train`) with checkpoints under
the stage's work folder (a rerun resumes), then write the evaluation EMA of the student as
``model.safetensors`` + ``model.json`` (kind "cm"; ``sampling.two_step_sigmas = [80, midpoint_sigma]``),
the raw student as ``online.safetensors``, ``metrics.jsonl`` (the loss per log step) and the sample
grids ``samples-1step.png`` / ``samples-2step.png``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cmflow.stage import Artifact, StageContext, stage
from cmflow.stages.common import RUN_IGNORED, Preset, RunParams, log_rows, save_grids


class _ConsistencyParams(RunParams):
    distance: Literal["l2", "l1", "pseudo_huber", "lpips", "feature"] = Field(
        "l2",
        description="d(x, y). lpips: an LPIPS-style net on images resized to 224 (the paper); feature: the same "
        "kind of net at the data's resolution. Both take the net from input 'perceptual' or lpips_uri.",
    )
    huber_c: float | None = Field(None, gt=0, description="pseudo-Huber c (default 0.00054 sqrt(C H W)).")
    lpips_uri: str | None = Field(
        None, description="distance lpips / feature: folder with perceptual.json + perceptual.safetensors."
    )
    lpips_vgg16_uri: str | None = Field(
        None,
        description="distance lpips as published: torchvision's VGG16 weights (vgg16-397923af.pth, "
        "features.N.weight/bias); with lpips_lin_uri.",
    )
    lpips_lin_uri: str | None = Field(
        None,
        description="distance lpips as published: the LPIPS v0.1 VGG heads (the lpips package's v0.1/vgg.pth).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for lpips_uri / lpips_vgg16_uri / lpips_lin_uri."
    )
    weighting: Literal["uniform", "inverse_dt"] = "uniform"
    midpoint_sigma: float = Field(
        0.8, gt=0.002, lt=80, description="tau of the default 2-step sampler [80, tau]."
    )

    @model_validator(mode="after")
    def _lpips_uri(self) -> _ConsistencyParams:
        if self.lpips_uri and self.distance not in ("lpips", "feature"):
            raise ValueError("lpips_uri is only used with distance 'lpips' or 'feature'")
        published = (self.lpips_vgg16_uri is not None, self.lpips_lin_uri is not None)
        if any(published) and (not all(published) or self.distance != "lpips" or self.lpips_uri):
            raise ValueError(
                "lpips_vgg16_uri and lpips_lin_uri go together, with distance 'lpips' and without lpips_uri"
            )
        return self


class DistillParams(_ConsistencyParams):
    num_scales: int = Field(
        18, ge=2, description="N, the Karras grid size (CM: 18 CIFAR-10, 40 ImageNet-64)."
    )
    mu: float = Field(
        0.95, ge=0, le=1, description="Target EMA rate mu (theta- <- mu theta- + (1-mu) theta)."
    )


class TrainCMParams(_ConsistencyParams):
    method: Literal["ct", "ict"] = "ict"
    preset: Preset = Field("digits", description="UNet preset of the (freshly initialised) network.")
    unet: dict[str, Any] = Field(default_factory=dict, description="Overrides of the preset's UNetConfig.")
    s0: int = Field(0, ge=0, description="Curriculum start N (default: 2 for CT, 10 for iCT).")
    s1: int = Field(0, ge=0, description="Curriculum end N (default: 150 for CT, 1280 for iCT).")
    mu0: float = Field(0.9, ge=0, lt=1, description="CT: mu(0) of the target-EMA curriculum.")
    p_mean: float = Field(-1.1, description="iCT: lognormal noise-level mean.")
    p_std: float = Field(2.0, gt=0, description="iCT: lognormal noise-level std.")

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        ict = data.get("method", "ict") == "ict"
        filled = dict(data)
        filled.setdefault("s0", 10 if ict else 2)
        filled.setdefault("s1", 1280 if ict else 150)
        if ict:  # iCT: pseudo-Huber on the per-sample norm, lambda = 1 / (t_{n+1} - t_n)
            filled.setdefault("distance", "pseudo_huber")
            filled.setdefault("weighting", "inverse_dt")
        return filled

    @model_validator(mode="after")
    def _curriculum(self) -> TrainCMParams:
        if not 2 <= self.s0 <= self.s1:
            raise ValueError(f"need 2 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")
        return self


@stage(
    "distill",
    params=DistillParams,
    version="2",
    inputs=("teacher", "data"),
    optional_inputs=("perceptual",),
    cache_ignore=RUN_IGNORED,
    distributed=True,
)
def distill(params: DistillParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Consistency distillation (CM Alg. 2) of the EDM ``teacher`` on ``data`` (or teacher samples): one
    Heun teacher step between neighbours of the N-point Karras grid, target EMA mu, under Ray Train.

    Examples:
        distill: {kind: distill, inputs: {teacher: teacher, data: data}, params: {steps: 2000, mu: 0.95}}
    """
    teacher_config = inputs["teacher"].read_json("model.json")
    if teacher_config.get("kind") != "edm":
        from cmflow.errors import InputError

        raise InputError(
            f"stage {ctx.stage!r}: input 'teacher' must be an EDM model, got {teacher_config.get('kind')}"
        )
    config = {**teacher_config, "kind": "cm"}
    config.pop("source", None)
    config.pop("steps", None)
    return _train_and_write("cd", params, inputs, ctx, config, teacher_digest=inputs["teacher"].digest)


@stage(
    "train_cm",
    params=TrainCMParams,
    version="2",
    inputs=("data",),
    optional_inputs=("perceptual",),
    cache_ignore=RUN_IGNORED,
    distributed=True,
)
def train_cm(params: TrainCMParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Consistency training without a teacher: CT (CM Alg. 3, N(k) / mu(k) curricula) or iCT (mu = 0,
    pseudo-Huber, lognormal noise levels, exponential N(k)), under Ray Train.

    Examples:
        ict: {kind: train_cm, inputs: {data: data}, params: {method: ict, steps: 4000}}
    """
    from cmflow.models.io import model_config
    from cmflow.training.builders import build_cm

    info = inputs["data"].read_json("dataset.json")
    config = model_config(
        build_cm(
            params.preset, params.unet, info["channels"], info["resolution"], f"stages.{ctx.stage}.params"
        )
    )
    return _train_and_write(params.method, params, inputs, ctx, config, teacher_digest=None)


def _train_and_write(
    method: str,
    params: _ConsistencyParams,
    inputs: dict[str, Artifact],
    ctx: StageContext,
    config: dict[str, Any],
    *,
    teacher_digest: str | None,
) -> dict[str, Any]:
    from cmflow.data.shards import DatasetInfo
    from cmflow.diffusion.rng import mix_seed
    from cmflow.distributed.train import TrainJob, fit
    from cmflow.errors import InputError
    from cmflow.models.io import build_model, save_model, weights_bytes

    info = DatasetInfo.parse(inputs["data"].read_bytes("dataset.json"))
    has_net = params.lpips_uri or params.lpips_vgg16_uri or "perceptual" in inputs
    if params.distance in ("lpips", "feature") and not has_net:
        raise InputError(
            f"stage {ctx.stage!r}: distance {params.distance!r} needs a perceptual network; wire "
            "inputs.perceptual to a perceptual_net stage, or set lpips_vgg16_uri + lpips_lin_uri (or lpips_uri)"
        )
    num_classes = int(config.get("num_classes", 0) or 0)
    if num_classes and not info.has_labels:
        raise InputError(
            f"stage {ctx.stage!r}: the network is class-conditional but the dataset has no labels; set "
            "use_labels: true in prepare_data"
        )
    job = TrainJob(
        method=method,  # type: ignore[arg-type]
        params=params.model_dump(mode="json"),
        seed=mix_seed(params.seed, ctx.seed),
        stage=ctx.stage,
        data=inputs["data"],
        num_classes=num_classes,
        teacher=inputs.get("teacher"),
        perceptual=inputs.get("perceptual"),
        threads=ctx.num_threads,
        use_gpu=ctx.resources.gpus > 0,
        reporter=ctx.reporter,
    )
    ctx.progress(0, params.steps, message=f"starting {ctx.resources.workers} Ray Train worker(s)")
    content = fit(job, ctx, max_failures=params.max_failures)
    log_rows(ctx, content["metrics"])
    student, online = build_model(config), build_model(config)
    student.load_state_dict(content["ema"])
    online.load_state_dict(content["online"])
    extra: dict[str, Any] = {
        "sampling": {"two_step_sigmas": [80.0, float(params.midpoint_sigma)], "one_step_sigmas": [80.0]},
        "dataset_digest": info.digest,
        "method": method,
        "steps": int(content["step"]),
    }
    if teacher_digest is not None:
        extra["teacher_digest"] = teacher_digest
    saved = save_model(student.eval(), ctx.out_dir, **extra)
    (ctx.out_dir / "online.safetensors").write_bytes(weights_bytes(online))
    grids = {
        "samples-1step.png": {"method": "cm", "sigmas": [80.0]},
        "samples-2step.png": {"method": "cm", "sigmas": [80.0, float(params.midpoint_sigma)]},
    }
    save_grids((ctx.out_dir / "model.safetensors").read_bytes(), saved, grids, params.grid_samples, ctx)
    rows = content["metrics"]
    return {
        "steps": int(content["step"]),
        "final_loss": float(rows[-1]["loss"]) if rows else None,
        "resumed_from_step": int(content.get("resumed_from_step", 0)),
    }
