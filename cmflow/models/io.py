"""Model files: ``model.safetensors`` (weights) + ``model.json`` (config), no pickled code.

``model.json``::

    {"format": 1, "kind": "cm" | "edm", "backbone": "unet" | "adm",
     "unet": UNetConfig.to_dict()  (backbone "unet")  |  "adm": ADMConfig.to_dict()  (backbone "adm"),
     "precond": {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "c_noise_scale": 0.25},
     "image": {"channels": C, "resolution": R}, "num_classes": 0, ...extra}

``backbone`` names an entry of :data:`BACKBONES`: cmflow's own :class:`~cmflow.models.unet.UNet` or the
openai/consistency_models :class:`~cmflow.models.adm.ADM`. Files written before it existed have neither
``backbone`` nor ``c_noise_scale``; they load as ``"unet"`` with c_noise = 1/4 ln sigma.

The weights are the state dict of the preconditioned module (keys ``backbone.*``). Loading builds the
classes named by ``kind`` from this config, then loads the tensors with ``strict=True``; a state dict in
``.pt`` form is accepted only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cmflow.models.adm import ADM, ADMConfig
from cmflow.models.precond import CMPrecond, EDMPrecond
from cmflow.models.unet import UNet, UNetConfig

FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "model.json"

#: backbone name in model.json -> (module class, config class); the config sits under the same key.
BACKBONES: dict[str, tuple[type[torch.nn.Module], Any]] = {
    "unet": (UNet, UNetConfig),
    "adm": (ADM, ADMConfig),
}


def backbone_name(backbone: torch.nn.Module) -> str:
    """The :data:`BACKBONES` key of a backbone instance."""
    for name, (cls, _) in BACKBONES.items():
        if type(backbone) is cls:
            return name
    raise ValueError(f"{type(backbone).__name__} is not a known backbone ({', '.join(BACKBONES)})")


def model_config(model: EDMPrecond | CMPrecond, **extra: Any) -> dict[str, Any]:
    name = backbone_name(model.backbone)
    cfg = model.backbone.config  # type: ignore[union-attr]
    return {
        "format": FORMAT,
        "kind": "cm" if isinstance(model, CMPrecond) else "edm",
        "backbone": name,
        name: cfg.to_dict(),
        "precond": {
            "sigma_data": model.sigma_data,
            "sigma_min": model.sigma_min,
            "sigma_max": model.sigma_max,
            "c_noise_scale": model.c_noise_scale,
        },
        "image": {"channels": cfg.in_channels, "resolution": cfg.img_resolution},
        "num_classes": cfg.num_classes,
        **extra,
    }


def weights_bytes(model: torch.nn.Module) -> bytes:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def save_model(model: EDMPrecond | CMPrecond, out_dir: str | Path, **extra: Any) -> dict[str, Any]:
    """Write ``model.safetensors`` and ``model.json`` into ``out_dir``; returns the config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(model, **extra)
    (out_dir / WEIGHTS).write_bytes(weights_bytes(model))
    (out_dir / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
    return config


def build_model(config: dict[str, Any]) -> EDMPrecond | CMPrecond:
    """An untrained model of the architecture ``config`` describes."""
    if config.get("format") != FORMAT or config.get("kind") not in {"cm", "edm"}:
        raise ValueError(
            f"model config has format {config.get('format')!r} / kind {config.get('kind')!r}; expected format "
            f"{FORMAT} and kind 'cm' or 'edm'"
        )
    name = config.get("backbone", "unet")
    if name not in BACKBONES:
        raise ValueError(f"model config names backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    module_cls, config_cls = BACKBONES[name]
    backbone = module_cls(config_cls.from_dict(config[name]))
    precond = config.get("precond", {})
    cls = CMPrecond if config["kind"] == "cm" else EDMPrecond
    return cls(backbone, **precond)


def load_state(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes, or from a ``.pt`` state dict read with ``weights_only=True``."""
    if data[:8] and data[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        try:
            return st_load(data)
        except Exception as exc:  # noqa: BLE001 - SafetensorError is not importable as a class everywhere
            raise ValueError(f"the weights file is truncated or not valid safetensors ({exc})") from None
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the file is not a state dict of tensors")
    return state


def load_model(weights: bytes | str | Path, config: dict[str, Any] | str | Path) -> EDMPrecond | CMPrecond:
    """Build the model from its config and load its weights (strict); eval mode, on CPU."""
    if isinstance(config, str | Path):
        config = json.loads(Path(config).read_text())
    data = Path(weights).read_bytes() if isinstance(weights, str | Path) else weights
    model = build_model(config)
    state = load_state(data)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit the {config['kind']} architecture in model.json: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    return model.eval()
