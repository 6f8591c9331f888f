"""``import_model``: a released consistency model (openai ``.pt`` or a diffusers folder) as a model artifact.

The output is what ``distill`` / ``train_cm`` write (``model.safetensors`` + ``model.json``, kind "cm"), so
``evaluate`` measures a released model next to (or instead of) a distilled one, and ``register`` /
``promote`` put it in the registry the same way. ``cmflow models import`` registers one without a pipeline.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cmflow.stage import Artifact, ParamsModel, StageContext, stage


class ImportModelParams(ParamsModel):
    uri: str = Field(
        description="A released CD/CT checkpoint (s3://models/cd_imagenet64_lpips.pt) or a diffusers "
        "ConsistencyModelPipeline folder."
    )
    format: Literal["auto", "openai", "diffusers"] = Field(
        "auto", description="openai (.pt state dict), diffusers (folder) or auto (a file is openai)."
    )
    preset: Literal["adm-imagenet64", "adm-lsun256"] | None = Field(
        None, description="openai files: the ADM architecture (default: the preset the file fits)."
    )
    unet: dict[str, Any] = Field(
        default_factory=dict, description="openai files: overrides of ADMConfig fields."
    )
    two_step_sigma: float | None = Field(
        None, gt=0.002, lt=80, description="tau of the 2-step sampler [80, tau] (CD ImageNet-64: 1.382)."
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for `uri`.")


@stage(
    "import_model",
    params=ImportModelParams,
    version="1",
)
def import_model(params: ImportModelParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Read a released consistency model by URI (weights only, strict) and write it in cmflow's format.

    Examples:
        cd_released: {kind: import_model, params: {uri: s3://models/cd_imagenet64_l2.pt, two_step_sigma: 1.382}}
        evaluate: {kind: evaluate, inputs: {data: data, model: cd_released}, params: {extractor: inception-v3}}
    """
    from cmflow.interop import import_consistency_model
    from cmflow.models.io import save_model

    model, extra = import_consistency_model(
        params.uri, params.format, preset=params.preset, overrides=params.unet, options=params.storage_options
    )
    sampling: dict[str, Any] = {"one_step_sigmas": [model.sigma_max]}
    if params.two_step_sigma is not None:
        sampling["two_step_sigmas"] = [model.sigma_max, params.two_step_sigma]
    config = save_model(model, ctx.out_dir, sampling=sampling, **extra)
    return {
        "backbone": config["backbone"],
        "source": extra["source"],
        "params_count": sum(p.numel() for p in model.parameters()),
    }
