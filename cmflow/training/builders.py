"""Building and checking the networks the training stages use (torch only; URI loading is in :mod:`cmflow.loaders`)."""

from __future__ import annotations

from typing import Any

import torch

from cmflow.errors import InputError, SpecError
from cmflow.models.adm import ADM_PRESETS, make_adm
from cmflow.models.openai_format import C_NOISE_SCALE
from cmflow.models.precond import CMPrecond, EDMPrecond
from cmflow.models.unet import make_unet


def build_edm(preset: str, unet: dict[str, Any], channels: int, resolution: int, where: str) -> Any:
    """An untrained EDM denoiser around ``make_unet(preset, resolution, channels, **unet)``, or around the
    openai ADM for an ``adm-*`` preset (with c_noise = 250 ln sigma, as those checkpoints)."""

    try:
        if preset in ADM_PRESETS:
            shape = {"img_resolution": resolution, "in_channels": channels, "out_channels": channels}
            return EDMPrecond(make_adm(preset, **{**shape, **unet}), c_noise_scale=C_NOISE_SCALE)
        return EDMPrecond(make_unet(preset, resolution, channels, **unet))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}.unet does not describe a valid UNet ({exc}); fix the overrides") from None


def build_cm(preset: str, unet: dict[str, Any], channels: int, resolution: int, where: str) -> Any:
    """An untrained consistency model (CT / iCT start from scratch) around the same UNet family."""

    edm = build_edm(preset, unet, channels, resolution, where)
    return CMPrecond(edm.backbone, c_noise_scale=edm.c_noise_scale)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_image_shape(config: dict[str, Any], channels: int, resolution: int, where: str) -> None:
    image = config.get("image", {})
    if (image.get("channels"), image.get("resolution")) != (channels, resolution):
        raise InputError(
            f"{where} is a model of {image.get('channels')}x{image.get('resolution')}x{image.get('resolution')} "
            f"images but the data is {channels}x{resolution}x{resolution}; use a matching model or dataset"
        )
