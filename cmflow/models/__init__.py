"""Backbones and preconditioning wrappers (pure torch; no orchestration imports)."""

from cmflow.models.adm import ADM, ADM_PRESETS, ADMConfig, make_adm
from cmflow.models.precond import CMPrecond, EDMPrecond, cm_scalings, edm_scalings
from cmflow.models.unet import UNET_PRESETS, UNet, UNetConfig, make_unet

__all__ = [
    "ADM",
    "ADM_PRESETS",
    "ADMConfig",
    "UNET_PRESETS",
    "CMPrecond",
    "EDMPrecond",
    "UNet",
    "UNetConfig",
    "cm_scalings",
    "edm_scalings",
    "make_adm",
    "make_unet",
]
