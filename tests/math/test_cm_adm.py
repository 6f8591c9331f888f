"""The ADM backbone's pieces and the recorded c_noise scale (the numerics against diffusers and the
openai layout are in tests/interop)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from cmflow.models import ADM, ADMConfig, CMPrecond, EDMPrecond, make_unet
from cmflow.models.adm import timestep_embedding
from cmflow.models.io import build_model, load_model, save_model

SMALL = ADMConfig(
    img_resolution=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attn_resolutions=(4,), num_head_channels=32,
)  # fmt: skip


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.noise_labels: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.noise_labels = noise_labels
        return x * 0


@pytest.mark.parametrize("cls", [EDMPrecond, CMPrecond])
@pytest.mark.parametrize("scale", [0.25, 250.0])
def test_the_backbone_gets_c_noise_scale_ln_sigma(cls: type, scale: float) -> None:
    backbone = _Recorder()
    sigma = torch.tensor([0.002, 0.5, 5.0, 80.0])
    cls(backbone, c_noise_scale=scale)(torch.zeros(4, 1, 2, 2), sigma)
    expected = (scale * torch.log(sigma.double())).float()  # openai: 1000 * 0.25 * ln(sigma + 1e-44)
    assert torch.equal(backbone.noise_labels, expected)


def test_timestep_embedding_closed_form() -> None:
    t = torch.tensor([250 * math.log(0.002), 0.0, 250 * math.log(80.0)])
    emb = timestep_embedding(t, 192).double()
    i = torch.arange(96, dtype=torch.float64)
    w = 10000.0 ** (-i / 96)  # ADM: max_period^(-i / half), i = 0..half-1
    arg = t.double()[:, None] * w
    torch.testing.assert_close(emb, torch.cat([arg.cos(), arg.sin()], dim=1), atol=2e-4, rtol=0)
    assert torch.equal(emb[1], torch.cat([torch.ones(96), torch.zeros(96)]).double())


def test_model_json_records_the_backbone_and_old_files_still_load(tmp_path) -> None:  # noqa: ANN001
    adm = save_model(CMPrecond(ADM(SMALL), c_noise_scale=250.0), tmp_path / "adm")
    assert (
        adm["backbone"] == "adm"
        and adm["adm"]["model_channels"] == 32
        and adm["precond"]["c_noise_scale"] == 250.0
    )
    assert isinstance(build_model(adm).backbone, ADM)
    torch.manual_seed(0)
    unet = EDMPrecond(make_unet("tiny", 8, 1))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    config = save_model(unet, tmp_path / "unet")
    assert config["backbone"] == "unet" and config["precond"]["c_noise_scale"] == 0.25
    old = {k: v for k, v in config.items() if k != "backbone"}  # a model.json written before issue 15
    old["precond"] = {k: v for k, v in old["precond"].items() if k != "c_noise_scale"}
    (tmp_path / "unet" / "model.json").write_text(json.dumps(old))
    loaded = load_model(tmp_path / "unet" / "model.safetensors", tmp_path / "unet" / "model.json")
    x = torch.randn(2, 1, 8, 8)
    assert loaded.c_noise_scale == 0.25 and torch.equal(loaded(x, 1.3), unet.eval()(x, 1.3))
    with pytest.raises(ValueError, match="known backbones: unet, adm"):
        build_model({**config, "backbone": "dit"})


def test_labels_are_required_or_refused() -> None:
    conditional, unconditional = ADM(ADMConfig(**{**SMALL.to_dict(), "num_classes": 10})), ADM(SMALL)
    x, t = torch.zeros(1, 1, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, torch.tensor([3]))
    assert conditional(x, t, torch.tensor([3])).shape == x.shape
    assert torch.equal(
        unconditional(x, t), torch.zeros_like(x)
    )  # output conv zero-initialised (ADM zero_module)
