"""The perceptual_net stage and the feature / LPIPS-style distances it feeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stage_helpers import artifact, run_stage

from cmflow.diffusion.losses import CDLoss
from cmflow.errors import StageError
from cmflow.models.precond import CMPrecond, EDMPrecond
from cmflow.models.unet import make_unet
from cmflow.storage import Storage
from cmflow.training import perceptual


def test_perceptual_net_stage_learns_digits_and_gives_a_distance(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "store"))
    data = run_stage(storage, "prepare_data", {"source": "sklearn-digits", "max_images": 400})
    manifest = run_stage(storage, "perceptual_net", {"steps": 150}, {"data": data})
    assert sorted(manifest.files) == [perceptual.CONFIG, perceptual.WEIGHTS]
    assert manifest.meta["train_accuracy"] > 0.5
    art = artifact(storage, manifest)
    net = perceptual.load_perceptual(art.read_bytes(perceptual.WEIGHTS), art.read_json(perceptual.CONFIG))
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(net(x, x), torch.zeros(4))
    assert (net(x, x.flip(0)) > 0).all() and net(x, torch.rand(4, 1, 8, 8)).shape == (4,)


def test_perceptual_net_needs_labels(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "store"))
    data = run_stage(
        storage, "prepare_data", {"source": "sklearn-digits", "max_images": 50, "use_labels": False}
    )
    with pytest.raises(StageError, match="needs labels; set use_labels: true"):
        run_stage(storage, "perceptual_net", {"steps": 2}, {"data": data})


@pytest.mark.parametrize("feature", [True, False])
def test_feature_and_lpips_distances_train_a_student(feature: bool) -> None:
    torch.manual_seed(0)
    net = perceptual.PerceptualDistance(perceptual.small_config(1, 8, (8, 8)))
    teacher = EDMPrecond(make_unet("tiny", 8, 1)).eval().requires_grad_(False)
    student = CMPrecond.from_edm(teacher).requires_grad_(True)
    if feature:
        loss_fn = perceptual.feature_pair_loss(CDLoss(8), net)
    else:
        loss_fn = CDLoss(8, distance="lpips", lpips=net)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    loss = loss_fn(student, student, teacher, x, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in net.parameters())
