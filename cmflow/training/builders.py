"""Building and checking the networks the training stages use (torch only; URI loading is in :mod:`cmflow.loaders`)."""

from __future__ import annotations

from typing import Any

import torch

from cmflow.errors import InputError, SpecError


def build_edm(preset: str, unet: dict[str, Any], channels: int, resolution: int, where: str) -> Any:
    """An untrained EDM denoiser around ``make_unet(preset, resolution, channels, **unet)``."""
    from cmflow.models.precond import EDMPrecond
    from cmflow.models.unet import make_unet

    try:
        return EDMPrecond(make_unet(preset, resolution, channels, **unet))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}.unet does not describe a valid UNet ({exc}); fix the overrides") from None


def build_cm(preset: str, unet: dict[str, Any], channels: int, resolution: int, where: str) -> Any:
    """An untrained consistency model (CT / iCT start from scratch) around the same UNet family."""
    from cmflow.models.precond import CMPrecond

    return CMPrecond(build_edm(preset, unet, channels, resolution, where).backbone)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_image_shape(config: dict[str, Any], channels: int, resolution: int, where: str) -> None:
    image = config.get("image", {})
    if (image.get("channels"), image.get("resolution")) != (channels, resolution):
        raise InputError(
            f"{where} is a model of {image.get('channels')}x{image.get('resolution')}x{image.get('resolution')} "
            f"images but the data is {channels}x{resolution}x{resolution}; use a matching model or dataset"
        )
