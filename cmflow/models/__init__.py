"""Backbones and preconditioning wrappers (pure torch; no orchestration imports)."""

from cmflow.models.precond import CMPrecond, EDMPrecond, cm_scalings, edm_scalings
from cmflow.models.unet import UNET_PRESETS, UNet, UNetConfig, make_unet

__all__ = [
    "UNET_PRESETS",
    "CMPrecond",
    "EDMPrecond",
    "UNet",
    "UNetConfig",
    "cm_scalings",
    "edm_scalings",
    "make_unet",
]
