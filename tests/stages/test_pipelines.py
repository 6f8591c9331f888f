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
    } <= names


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_validates(path: Path) -> None:
    from cmflow.models.unet import UNET_PRESETS, UNetConfig

    spec = load_spec(path)
    assert spec.stages
    resolution = {"cifar10": 32, "imagenet64": 64, "lsun-bedroom256": 256}
    res = next((r for prefix, r in resolution.items() if spec.name.startswith(prefix)), 8)
    for stage in spec.stages.values():
        if stage.kind in {"teacher", "train_cm"} and "preset" in stage.params:
            fields = {**UNET_PRESETS[stage.params["preset"]], **stage.params.get("unet", {})}
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
            UNetConfig(img_resolution=res, in_channels=3, out_channels=3, **fields)


@pytest.mark.parametrize(
    "name", ["cifar10-cd.yaml", "cifar10-ict.yaml", "imagenet64-cd.yaml", "lsun-bedroom256-ct.yaml"]
)
def test_paper_pipelines_use_gpus_and_s3(name: str) -> None:
    spec = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / name)
    assert spec.storage.root.startswith("s3://")
    training = [s for s in spec.stages.values() if s.kind in {"distill", "train_cm"}]
    assert training and all(s.resources.gpus >= 1 and s.resources.workers >= 8 for s in training)
