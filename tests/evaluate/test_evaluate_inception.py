"""The evaluate stage with the Inception-v3 extractor: weights read from an s3:// URI, artifacts on S3."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cmflow.errors import InputError
from cmflow.metrics.inception import FID_WEIGHTS_FILENAME, FIDInceptionV3, build_fid_inception
from cmflow.stage import Artifact, StageContext
from cmflow.stages.evaluate.stage import EvaluateParams, evaluate
from cmflow.storage import Storage


def random_inception_bytes(seed: int = 0) -> bytes:
    """A state dict in the standard FID weights layout with random weights giving O(1) activations."""
    import torch

    model: FIDInceptionV3 = build_fid_inception()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def test_inception_weights_from_s3_with_artifacts_on_s3(
    s3_root: tuple[str, dict[str, str]],
    digits_images: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    make_ctx: Callable[..., StageContext],
) -> None:
    import fsspec

    from cmflow.data.shards import dataset_meta, write_dataset
    from cmflow.models import CMPrecond, make_unet
    from cmflow.models.io import save_model

    root, options = s3_root
    storage = Storage(root, options)
    weights = random_inception_bytes()
    weights_uri = f"{root}/weights/{FID_WEIGHTS_FILENAME}"
    with fsspec.open(weights_uri, "wb", **options) as handle:
        handle.write(weights)

    folder = tmp_path / "data"
    folder.mkdir()
    info = write_dataset(folder, digits_images[0][:6], None, source="test", num_classes=0)
    data = Artifact(storage, storage.commit("prepare_data", "d" * 64, folder, meta=dataset_meta(info)))
    model_dir = tmp_path / "cm"
    save_model(CMPrecond(make_unet("tiny", 8, 1)), model_dir)
    model = Artifact(storage, storage.commit("distill", "m" * 64, model_dir), tmp_path / "cache")

    params = EvaluateParams(
        extractor="inception-v3",
        weights_uri=weights_uri,
        num_samples=4,
        seeds=[0],
        midpoint=0.8,
        kid_subsets=2,
        grid_size=2,
        feature_batch_size=6,
    )
    ctx = make_ctx(storage_override=storage)
    meta = evaluate(params, {"data": data, "model": model}, ctx)
    import json

    report = json.loads((ctx.out_dir / "report.json").read_text())
    assert report["extractor"]["name"] == "inception-v3" and report["extractor"]["num_features"] == 2048
    assert report["extractor"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert report["reference"]["key"].startswith("fid-ref-inception-v3-8x8-")
    assert report["reference"]["features_kept"] == 6
    assert meta["extractor"] == "inception-v3" and np.isfinite(meta["fid_1step"]) and meta["fid_1step"] >= 0
    assert storage.load_manifest("fid_reference", report["reference"]["cache_key"]) is not None  # on S3

    # weights of another layout: one clean line naming the problem
    bad_uri = f"{root}/weights/bad.pth"
    buffer = io.BytesIO()
    __import__("torch").save({"conv.weight": __import__("torch").zeros(1)}, buffer)
    with fsspec.open(bad_uri, "wb", **options) as handle:
        handle.write(buffer.getvalue())
    with pytest.raises(InputError, match="cannot load the inception-v3 extractor weights"):
        evaluate(
            params.model_copy(update={"weights_uri": bad_uri}),
            {"data": data, "model": model},
            make_ctx(storage_override=storage),
        )
    with pytest.raises(InputError, match="does not exist"):
        evaluate(
            params.model_copy(update={"weights_uri": f"{root}/weights/missing.pth"}),
            {"data": data, "model": model},
            make_ctx(storage_override=storage),
        )
