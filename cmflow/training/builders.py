"""Building, loading and checking the networks the training stages use (torch + fsspec, no Ray)."""

from __future__ import annotations

import json
import pickle
from typing import Any

import torch

from cmflow.errors import InputError, SpecError
from cmflow.spec import redact_uri


def build_edm(preset: str, unet: dict[str, Any], channels: int, resolution: int, where: str) -> Any:
    """An untrained EDM denoiser around ``make_unet(preset, resolution, channels, **unet)``, or around the
    openai ADM for an ``adm-*`` preset (with c_noise = 250 ln sigma, as those checkpoints)."""
    from cmflow.models.adm import ADM_PRESETS, make_adm
    from cmflow.models.openai_format import C_NOISE_SCALE
    from cmflow.models.precond import EDMPrecond
    from cmflow.models.unet import make_unet

    try:
        if preset in ADM_PRESETS:
            shape = {"img_resolution": resolution, "in_channels": channels, "out_channels": channels}
            return EDMPrecond(make_adm(preset, **{**shape, **unet}), c_noise_scale=C_NOISE_SCALE)
        return EDMPrecond(make_unet(preset, resolution, channels, **unet))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}.unet does not describe a valid UNet ({exc}); fix the overrides") from None


def build_cm(preset: str, unet: dict[str, Any], channels: int, resolution: int, where: str) -> Any:
    """An untrained consistency model (CT / iCT start from scratch) around the same UNet family."""
    from cmflow.models.precond import CMPrecond

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


def _first_existing(fs: Any, base: str, names: tuple[str, ...]) -> str | None:
    for name in names:
        if fs.exists(f"{base}/{name}"):
            return name
    return None


def load_model_uri(uri: str, options: dict[str, Any], kind: str) -> tuple[Any, dict[str, Any]]:
    """A model from a folder URI holding ``model.json`` and ``model.safetensors`` (or a weights-only ``model.pt``).

    Returns (model in eval mode, its config). Every problem (missing file, bad JSON, a pickle with code,
    weights of another architecture, a model of the wrong kind) is an :class:`InputError`.
    """
    import fsspec

    from cmflow.models.io import load_model
    from cmflow.storage import open_uri

    base = uri.rstrip("/")
    where = redact_uri(base)
    try:
        fs, path = fsspec.core.url_to_fs(base, **options)
        weights_name = _first_existing(fs, path.rstrip("/"), ("model.safetensors", "model.pt"))
    except (ValueError, ImportError) as exc:
        raise InputError(f"cannot open {where}: {exc}; use a folder path, file:// or s3:// URI") from None
    if weights_name is None:
        raise InputError(f"{where} holds neither model.safetensors nor model.pt; point uri at a model folder")
    try:
        config = json.loads(open_uri(f"{base}/model.json", options))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}/model.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("kind") != kind:
        found = config.get("kind") if isinstance(config, dict) else None
        raise InputError(f"{where}/model.json describes a {found!r} model; this stage needs kind {kind!r}")
    weights = open_uri(f"{base}/{weights_name}", options)
    try:
        model = load_model(weights, config)
    except pickle.UnpicklingError as exc:  # torch's weights_only refusal of a pickle with code
        raise InputError(
            f"{where}/{weights_name} was refused: it is not a weights-only state dict "
            f"({str(exc).splitlines()[0][:160]}); save it with torch.save(model.state_dict())"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{where}/{weights_name} does not fit model.json: {exc}") from None
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        if "state_dict" in first or "size mismatch" in str(exc):
            raise InputError(
                f"{where}/{weights_name} does not fit the architecture in model.json ({first})"
            ) from None
        raise InputError(f"{where}/{weights_name} is not a readable weights file ({first})") from None
    return model, config
