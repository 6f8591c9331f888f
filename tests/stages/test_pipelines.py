"""Every declared pipeline validates, and the UNet each trains or loads is a valid architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmflow.validate import load_spec

PIPELINES = sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("*.yaml"))


def test_the_expected_pipelines_exist() -> None:
    names = {p.name for p in PIPELINES}
    assert {
        "digits.yaml",
        "digits-ict.yaml",
        "tiny.yaml",
        "cifar10-cd.yaml",
        "cifar10-ict.yaml",
        "imagenet64-cd.yaml",
        "lsun-bedroom256-ct.yaml",
        "lsun-bedroom256-cd.yaml",
    } <= names


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_validates(path: Path) -> None:
    from cmflow.models.adm import ADM_PRESETS, ADMConfig
    from cmflow.models.unet import UNET_PRESETS, UNetConfig

    spec = load_spec(path)
    assert spec.stages
    resolution = {"cifar10": 32, "imagenet64": 64, "lsun-bedroom256": 256}
    res = next((r for prefix, r in resolution.items() if spec.name.startswith(prefix)), 8)
    for stage in spec.stages.values():
        if stage.kind in {"teacher", "train_cm"} and stage.params.get("preset") in ADM_PRESETS:
            fields = {**ADM_PRESETS[stage.params["preset"]], **stage.params.get("unet", {})}
            assert ADMConfig(**fields).img_resolution == res
        elif stage.kind in {"teacher", "train_cm"} and "preset" in stage.params:
            fields = {**UNET_PRESETS[stage.params["preset"]], **stage.params.get("unet", {})}
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
            UNetConfig(img_resolution=res, in_channels=3, out_channels=3, **fields)


@pytest.mark.parametrize(
    "name",
    [
        "cifar10-cd.yaml",
        "cifar10-ict.yaml",
        "imagenet64-cd.yaml",
        "lsun-bedroom256-ct.yaml",
        "lsun-bedroom256-cd.yaml",
    ],
)
def test_paper_pipelines_use_gpus_and_s3(name: str) -> None:
    spec = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / name)
    assert spec.storage.root.startswith("s3://")
    training = [s for s in spec.stages.values() if s.kind in {"distill", "train_cm"}]
    assert training and all(s.resources.gpus >= 1 and s.resources.workers >= 8 for s in training)


@pytest.mark.parametrize(
    ("name", "teacher", "preset", "tau"),
    [
        ("imagenet64-cd.yaml", "edm_imagenet64_ema.pt", "adm-imagenet64", 1.382),
        ("lsun-bedroom256-cd.yaml", "edm_bedroom256_ema.pt", "adm-lsun256", 4.366),
    ],
)
def test_paper_cd_pipelines_start_from_the_released_teachers(
    name: str, teacher: str, preset: str, tau: float
) -> None:
    """The teacher is OpenAI's released file by URI, read as an openai checkpoint of the preset's ADM; the
    distillation uses the published LPIPS files and the launch.sh hyperparameters."""
    spec = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / name)
    params = spec.stages["teacher"].params
    assert (
        params["uri"].endswith("/" + teacher) and params["format"] == "openai" and params["preset"] == preset
    )
    distill = spec.stages["distill"].params
    assert distill["lpips_vgg16_uri"] and distill["lpips_lin_uri"] and distill["distance"] == "lpips"
    assert (distill["num_scales"], distill["mu"], distill["optimizer"]) == (40, 0.95, "radam")
    assert distill["midpoint_sigma"] == tau
