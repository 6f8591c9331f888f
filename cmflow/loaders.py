"""Models and perceptual networks read from URIs (local paths, ``file://``, ``s3://``) through fsspec.

Every problem -- a missing file, bad JSON, a pickle with code, weights of another architecture, a model of
the wrong kind -- is an :class:`~cmflow.errors.InputError` naming the file and the fix. Weights are read
with safetensors or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import fsspec

from cmflow.errors import InputError
from cmflow.redact import redact_uri
from cmflow.storage import open_uri
from cmflow.training.perceptual import CONFIG, WEIGHTS, PerceptualDistance, load_perceptual


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
    from cmflow.models.io import load_model

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


def load_perceptual_uri(uri: str | None, options: dict[str, Any]) -> PerceptualDistance:
    """The perceptual network in the folder ``uri`` (``perceptual.json`` + ``perceptual.safetensors``)."""
    if not uri:
        raise InputError(
            "distance 'lpips' needs lpips_uri: a folder with perceptual.json + perceptual.safetensors"
        )
    base = uri.rstrip("/")
    try:
        config = json.loads(open_uri(f"{base}/{CONFIG}", options))
        return load_perceptual(open_uri(f"{base}/{WEIGHTS}", options), config)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"{redact_uri(base)} is not a usable perceptual network ({exc})") from None


def load_published_lpips(vgg16_uri: str, lin_uri: str, options: dict[str, Any]) -> Any:
    """LPIPS v0.1 as published (:mod:`cmflow.metrics.lpips`): torchvision's VGG16 file and the lpips
    package's v0.1 VGG heads, read by URI (weights only, strict)."""
    from cmflow.metrics.lpips import load_lpips

    vgg16, lins = open_uri(vgg16_uri, options), open_uri(lin_uri, options)
    try:
        return load_lpips(vgg16, lins)
    except pickle.UnpicklingError:
        raise InputError(
            f"{redact_uri(vgg16_uri)} or {redact_uri(lin_uri)} was refused: not a weights-only state dict"
        ) from None
    except (ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or ["unreadable"])[0][:200]
        raise InputError(
            f"LPIPS weights {redact_uri(vgg16_uri)} + {redact_uri(lin_uri)} do not fit ({first}); pass "
            "torchvision's vgg16 state dict and the lpips package's weights/v0.1/vgg.pth"
        ) from None
