"""cmflow's ADM against the real diffusers library: released-layout weights, denoiser outputs, pipelines.

Random weights are saved the way the released files are (``torch.save`` of the plain state dict), read
back through cmflow's openai loader, and mapped into diffusers' ``UNet2DModel`` with cmflow's key mapping;
the two networks then give the same denoiser D(x; sigma) (EDM scalings, the teachers) and consistency
function f(x, sigma) (boundary scalings, CM Eq. (5)), with diffusers' own scalings
(``CMStochasticIterativeScheduler.get_scalings`` / ``get_scalings_for_boundary_condition``). Nothing
downloads; every tolerance is 1e-5 relative (float32), as the issue asks.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from released_helpers import (
    REDUCED_64,
    REDUCED_256,
    SIGMAS,
    adm_timestep,
    diffusers_pipeline_folder,
    max_rel,
    random_adm,
    save_released,
    sigma_batch,
)

from cmflow import interop
from cmflow.models import diffusers_format as dfmt
from cmflow.models.adm import ADM_PRESETS, ADMConfig
from cmflow.models.io import load_model, save_model
from cmflow.models.openai_format import adm_config_for, build_openai_model, expected_shapes
from cmflow.models.precond import CMPrecond

diffusers = pytest.importorskip("diffusers")

# The UNet2DModel configs diffusers' scripts/convert_consistency_to_diffusers.py converts the released
# checkpoints to (IMAGENET_64_UNET_CONFIG, LSUN_256_UNET_CONFIG), as data.
PUBLISHED = {
    "adm-imagenet64": {
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 3,
        "num_class_embeds": 1000,
        "block_out_channels": [192, 384, 576, 768],
        "attention_head_dim": 64,
        "down_block_types": [
            "ResnetDownsampleBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "resnet_time_scale_shift": "scale_shift",
        "attn_norm_num_groups": 32,
        "upsample_type": "resnet",
        "downsample_type": "resnet",
    },
    "adm-lsun256": {
        "sample_size": 256,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 2,
        "num_class_embeds": None,
        "block_out_channels": [256, 256, 512, 512, 1024, 1024],
        "attention_head_dim": 64,
        "down_block_types": ["ResnetDownsampleBlock2D"] * 3 + ["AttnDownBlock2D"] * 3,
        "up_block_types": ["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"] * 3,
        "resnet_time_scale_shift": "default",
        "upsample_type": "resnet",
        "downsample_type": "resnet",
    },
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_presets_have_the_released_layout(preset: str) -> None:
    """Every key/shape of the preset maps, strictly, onto diffusers' model for the published config (the
    converter's target for the released files), and the preset's diffusers config is that config."""
    from diffusers import UNet2DModel

    config = ADMConfig(**ADM_PRESETS[preset])
    ours = dfmt.unet_config(config)
    for field, value in PUBLISHED[preset].items():
        if field != "attn_norm_num_groups":  # LSUN: diffusers' default (None) already means 32 groups there
            assert ours[field] == value, field
    shapes = expected_shapes(config)
    with torch.device("meta"):
        theirs = UNet2DModel(**PUBLISHED[preset]).state_dict()
        mapped = dfmt.to_diffusers_state({k: torch.empty(s) for k, s in shapes.items()}, config)
    assert set(mapped) == set(theirs)
    assert all(mapped[k].shape == theirs[k].shape for k in theirs)
    assert len(shapes) == {"adm-imagenet64": 541, "adm-lsun256": 566}[preset]  # cm/unet.py UNetModel keys
    spot = {  # shapes fixed by the architecture (192 or 256 channels, 4x time embedding, 3x3 convs)
        "adm-imagenet64": {
            "time_embed.0.weight": (768, 192),
            "label_emb.weight": (1000, 768),
            "input_blocks.0.0.weight": (192, 3, 3, 3),
            "input_blocks.4.0.in_layers.2.weight": (192, 192, 3, 3),  # the resblock_updown downsampler
            "input_blocks.4.0.emb_layers.1.weight": (384, 768),  # scale and shift
            "middle_block.1.qkv.weight": (2304, 768, 1, 1),
            "output_blocks.3.2.out_layers.3.weight": (768, 768, 3, 3),  # the first upsampler
            "out.2.weight": (3, 192, 3, 3),
        },
        "adm-lsun256": {
            "time_embed.2.weight": (1024, 1024),
            "input_blocks.1.0.emb_layers.1.weight": (256, 1024),  # no scale-shift norm
            "middle_block.1.proj_out.weight": (1024, 1024, 1, 1),
            "out.2.weight": (3, 256, 3, 3),
        },
    }[preset]
    for key, shape in spot.items():
        assert tuple(shapes[key]) == shape, key
    assert ("label_emb.weight" in shapes) == (preset == "adm-imagenet64")


def _diffusers_unet(state: dict[str, torch.Tensor], config: ADMConfig):  # noqa: ANN202
    from diffusers import UNet2DModel

    with torch.device("meta"):
        unet = UNet2DModel(**{k: v for k, v in dfmt.unet_config(config).items() if not k.startswith("_")})
    unet.load_state_dict(dfmt.to_diffusers_state(state, config), strict=True, assign=True)
    return unet.eval()


CASES = {
    # name: (config, preset and overrides that describe it to the loader, number of classes)
    "imagenet64-full-labels": (ADMConfig(**ADM_PRESETS["adm-imagenet64"]), "adm-imagenet64", {}),
    "64px-reduced-no-labels": (
        REDUCED_64,
        "adm-imagenet64",
        {"model_channels": 32, "num_res_blocks": 1, "num_head_channels": 32, "num_classes": 0},
    ),
    "256px-reduced-no-labels": (
        REDUCED_256,
        "adm-lsun256",
        {"model_channels": 32, "num_res_blocks": 1, "num_head_channels": 32},
    ),
    "256px-reduced-labels": (
        replace(REDUCED_256, num_classes=10),
        "adm-lsun256",
        {"model_channels": 32, "num_res_blocks": 1, "num_head_channels": 32, "num_classes": 10},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_denoiser_equals_diffusers_unet2dmodel(case: str, tmp_path: Path) -> None:
    from diffusers import CMStochasticIterativeScheduler

    config, preset, overrides = CASES[case]
    torch.set_num_threads(2)  # the full 296 M-parameter ImageNet-64 model
    released = save_released(tmp_path / "edm_released.pt", random_adm(config, seed=3))
    state = interop.read_openai_state(str(released), {})
    found, problem = adm_config_for(state, preset, **overrides)
    assert problem is None and found == config
    teacher = build_openai_model(state, found, "edm")  # the openai loader: strict, c_noise = 250 ln sigma
    student = CMPrecond(teacher.backbone, c_noise_scale=teacher.c_noise_scale)  # same weights, CM scalings
    unet = _diffusers_unet(state, found)
    scheduler = CMStochasticIterativeScheduler()

    sigma = sigma_batch()  # (4,): one sample per noise level
    g = torch.Generator().manual_seed(11)
    x = (
        torch.randn(len(sigma), 3, config.img_resolution, config.img_resolution, generator=g)
        * sigma[:, None, None, None]
    )
    labels = torch.randint(0, config.num_classes, (len(sigma),), generator=g) if config.num_classes else None
    col = sigma[:, None, None, None]
    with torch.no_grad():
        d_ours = teacher(x, sigma, class_labels=labels)
        f_ours = student(x, sigma, class_labels=labels)
        c_in = 1 / (col**2 + 0.25).sqrt()
        F = unet(c_in * x, adm_timestep(sigma), class_labels=labels).sample
        c_skip, c_out = scheduler.get_scalings(col)
        d_theirs = c_skip * x + c_out * F
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition(col)
        f_theirs = c_skip * x + c_out * F
    for i, s in enumerate(SIGMAS):
        errors = {
            "D": max_rel(d_ours[i], d_theirs[i]),
            "f": max_rel(f_ours[i], f_theirs[i]),
        }
        print(f"{case} sigma={s}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        assert max(errors.values()) <= 1e-5, (s, errors)
    assert torch.equal(f_ours[0], x[0])  # f(x, sigma_min) == x exactly (the boundary condition)


def _saved_cm(tmp_path: Path, config: ADMConfig, seed: int = 5) -> tuple[Path, dict]:
    """A released-layout CD checkpoint imported with cmflow (as `cmflow models import` does) and saved as a
    cmflow model folder."""
    fields = (
        "img_resolution",
        "channel_mult",
        "model_channels",
        "num_res_blocks",
        "num_head_channels",
        "num_classes",
    )
    overrides = {f: getattr(config, f) for f in fields}
    released = save_released(tmp_path / "cd_test.pt", random_adm(config, seed=seed))
    model, extra = interop.import_consistency_model(
        str(released), "openai", preset="adm-imagenet64", overrides=overrides
    )
    assert model.backbone.config == config
    folder = tmp_path / "cm"
    return folder, save_model(model, folder, **extra)


def test_exported_pipeline_samples_equal_cmflow(tmp_path: Path) -> None:
    """1-step and 2-step (timesteps [22, 0] of N = 40, tau = 1.382) samples of the exported folder, loaded by
    ConsistencyModelPipeline.from_pretrained, equal cmflow's for the same latents and noise."""
    from diffusers import ConsistencyModelPipeline

    from cmflow.diffusion.noise_levels import karras_sigmas
    from cmflow.diffusion.samplers import cm_sample

    config = replace(REDUCED_64, num_classes=10)
    folder, config_json = _saved_cm(tmp_path, config)
    assert config_json["backbone"] == "adm" and config_json["precond"]["c_noise_scale"] == 250.0
    out = interop.export_diffusers(
        folder / "model.safetensors", config_json, tmp_path / "pipe", num_train_timesteps=40
    )
    pipe = ConsistencyModelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    cm = load_model(folder / "model.safetensors", config_json)
    z = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 7])
    tau = float(karras_sigmas(40, 0.002, 80.0).flip(0)[22])  # descending index 22 (openai --ts 0,22,39)
    assert tau == pytest.approx(1.382, abs=5e-4)
    with torch.no_grad():
        for kwargs, sigmas in (({"num_inference_steps": 1}, [80.0]), ({"timesteps": [22, 0]}, [80.0, tau])):
            theirs = pipe(
                batch_size=2,
                class_labels=labels,
                latents=z,
                output_type="pt",
                generator=torch.Generator().manual_seed(9),
                **kwargs,
            ).images
            ours = cm_sample(cm, z, sigmas, generator=torch.Generator().manual_seed(9), class_labels=labels)
            ours = (ours / 2 + 0.5).clamp(0, 1)  # the pipeline's output mapping
            err = float((theirs - ours).abs().max())
            print(f"pipeline {len(sigmas)}-step: max |diffusers - cmflow| = {err:.1e} (images in [0, 1])")
            assert err <= 1e-5
            assert float(ours.std()) > 0.05  # not a constant image


def test_imported_diffusers_folder_round_trips(tmp_path: Path) -> None:
    """A folder written by diffusers itself -> cmflow CM -> exported folder: same configs, same tensors, and
    the CM's outputs equal the diffusers UNet's."""
    from diffusers import CMStochasticIterativeScheduler, UNet2DModel

    config = replace(REDUCED_256, num_classes=10)
    original = diffusers_pipeline_folder(
        tmp_path / "original", dfmt.unet_config(config), num_train_timesteps=151
    )
    model, extra = interop.import_consistency_model(str(original), "auto")
    assert model.backbone.config == config and extra["diffusers"] == {"num_train_timesteps": 151}
    saved = save_model(model, tmp_path / "cm", **extra)
    again = interop.export_diffusers(tmp_path / "cm" / "model.safetensors", saved, tmp_path / "again")

    unet_a = UNet2DModel.from_pretrained(original / "unet").eval()
    unet_b = UNet2DModel.from_pretrained(again / "unet").eval()
    assert {k: v for k, v in unet_a.config.items() if not k.startswith("_")} == {
        k: v for k, v in unet_b.config.items() if not k.startswith("_")
    }
    state_a, state_b = unet_a.state_dict(), unet_b.state_dict()
    assert set(state_a) == set(state_b) and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    sched_a = CMStochasticIterativeScheduler.from_pretrained(original / "scheduler").config
    sched_b = CMStochasticIterativeScheduler.from_pretrained(again / "scheduler").config
    assert {k: v for k, v in sched_a.items() if not k.startswith("_")} == {
        k: v for k, v in sched_b.items() if not k.startswith("_")
    }
    assert json.loads((again / "model_index.json").read_text())["_class_name"] == "ConsistencyModelPipeline"

    sigma = sigma_batch()
    x = torch.randn(4, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 6, 9])
    with torch.no_grad():
        c_in = 1 / (sigma[:, None, None, None] ** 2 + 0.25).sqrt()
        theirs = unet_a(c_in * x, adm_timestep(sigma), class_labels=labels).sample
        ours = model.backbone(c_in * x, model.scalings(sigma)[3], labels)
    assert max_rel(ours, theirs) <= 1e-5
