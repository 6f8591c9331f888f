"""Helpers for tests of released models: random ADM weights in the openai layout, diffusers folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cmflow.models.adm import ADM, ADM_PRESETS, ADMConfig
from cmflow.models.openai_format import expected_shapes

SIGMAS = (0.002, 0.5, 5.0, 80.0)

# Reduced configs (the full LSUN-256 ADM is 0.5 G parameters): the same block structure, fewer channels.
REDUCED_64 = ADMConfig(
    img_resolution=64, model_channels=32, channel_mult=(1, 2, 3, 4), num_res_blocks=1, num_head_channels=32
)
REDUCED_256 = ADMConfig(
    img_resolution=256,
    model_channels=32,
    channel_mult=(1, 1, 2, 2, 4, 4),
    num_res_blocks=1,
    num_head_channels=32,
    use_scale_shift_norm=False,
)
# 8x8 grey digits (the shipped FID extractor's data), with the ADM block structure
DIGITS_ADM = ADMConfig(
    img_resolution=8,
    in_channels=1,
    out_channels=1,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    num_head_channels=32,
    num_classes=10,
)


def reduced(preset: str, **overrides: Any) -> dict[str, Any]:
    """Overrides that shrink ``preset`` the way the reduced configs do (for ``unet:`` / ``--set``)."""
    base = {"model_channels": 32, "num_res_blocks": 1, "num_head_channels": 32}
    assert preset in ADM_PRESETS
    return {**base, **overrides}


def random_state(config: ADMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every key of the released layout, scaled like PyTorch's default init (std
    1 / sqrt(3 fan_in) for weights, GroupNorm gains near 1); no layer is zero, unlike a fresh ADM whose
    output convolutions start at zero. Fast for the 296 M-parameter model (no module init)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes(config).items():
        if len(shape) > 1 and not key.startswith("label_emb"):
            std = 1.0 / (3.0 * torch.Size(shape[1:]).numel()) ** 0.5
            state[key] = torch.randn(shape, generator=g) * std
        elif key.endswith(".weight") and len(shape) == 1:  # GroupNorm gain
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # biases, GroupNorm shifts, the class embedding (nn.Embedding's N(0, 1))
            state[key] = torch.randn(shape, generator=g) * (1.0 if key.startswith("label_emb") else 0.05)
    return state


def random_adm(config: ADMConfig, seed: int = 0) -> ADM:
    """An ADM holding :func:`random_state` (built on the meta device, then given the tensors); eval mode."""
    with torch.device("meta"):
        model = ADM(config)
    model.load_state_dict(random_state(config, seed), strict=True, assign=True)
    return model.eval()


def save_released(path: Path, model: ADM) -> Path:
    """Save like the released files: ``torch.save`` of the plain state dict."""
    torch.save(model.state_dict(), path)
    return path


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def sigma_batch(n_per_sigma: int = 1) -> torch.Tensor:
    """(4 n,) the four test noise levels, each repeated n times (one batch covers them all)."""
    return torch.tensor(SIGMAS).repeat_interleave(n_per_sigma)


def adm_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """250 ln sigma in float64, the way diffusers' scheduler computes ``sigma_to_t``."""
    return 250.0 * torch.log(sigma.to(torch.float64))


def diffusers_pipeline_folder(
    folder: Path, unet_config: dict[str, Any], num_train_timesteps: int = 40, seed: int = 0
) -> Path:
    """A ConsistencyModelPipeline folder written by the real diffusers library (random UNet weights)."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
    scheduler = CMStochasticIterativeScheduler(
        num_train_timesteps=num_train_timesteps, sigma_min=0.002, sigma_max=80.0
    )
    ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder
