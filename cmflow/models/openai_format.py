"""Released openai/consistency_models checkpoints (``edm_imagenet64_ema.pt``, ``cd_imagenet64_l2.pt``, ...).

Those files are ``torch.save``-d state dicts of ``cm/unet.py``'s ``UNetModel``, whose keys are exactly
:class:`cmflow.models.adm.ADM`'s. Reading them never runs pickled code (``torch.load(weights_only=True)``),
and loading is strict: every key of the architecture must be there with its shape and nothing else may be.

The wrappers get c_noise = 250 ln sigma (``c_noise_scale = 250``; openai ``KarrasDenoiser.denoise``),
sigma_data = 0.5, sigma_min = 0.002, sigma_max = 80 (``cm/script_util.py``): an EDM teacher is an
:class:`~cmflow.models.precond.EDMPrecond` (the unshifted EDM scalings, ``distillation=False``), a CD / CT
model a :class:`~cmflow.models.precond.CMPrecond` (the boundary-condition scalings, CM Eq. (5)).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import Tensor

from cmflow.models.adm import ADM, ADM_PRESETS, ADMConfig
from cmflow.models.precond import CMPrecond, EDMPrecond

__all__ = [
    "C_NOISE_SCALE",
    "adm_config_for",
    "build_openai_model",
    "expected_shapes",
    "first_mismatch",
    "is_openai_state",
    "read_torch_state",
]

C_NOISE_SCALE = 250.0  # c_noise = 1000 * 0.25 * ln sigma
SIGMAS = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
MARKER_KEYS = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")


def read_torch_state(data: bytes) -> dict[str, Tensor]:
    """A state dict of tensors from ``torch.save`` bytes, read with ``weights_only=True``, as float32.

    Raises ``pickle.UnpicklingError`` when the pickle needs code beyond tensors and containers, and
    ``ValueError`` when the file holds something other than a flat dict of tensors.
    """
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as exc:  # not a torch file, or truncated
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(f"not a readable torch checkpoint ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError("the file is not a state dict of tensors")
    return {str(k): v.float() if v.is_floating_point() else v for k, v in state.items()}


def is_openai_state(state: dict[str, Tensor]) -> bool:
    """Whether the keys look like a ``cm/unet.py`` ``UNetModel`` state dict."""
    return all(k in state for k in MARKER_KEYS)


def expected_shapes(config: ADMConfig) -> dict[str, torch.Size]:
    """Key -> shape of :class:`ADM` for ``config``, in module order (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = ADM(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def first_mismatch(expected: dict[str, torch.Size], state: dict[str, Tensor]) -> str | None:
    """The first difference between an architecture's keys/shapes and a state dict, in words (or None).

    Walks the architecture's keys in order, so the first entry named is the earliest layer that differs;
    extra keys in the file are reported after that.
    """
    for key, shape in expected.items():
        if key not in state:
            return f"key {key} (shape {tuple(shape)}) is missing from the checkpoint"
        if state[key].shape != shape:
            return f"key {key} has shape {tuple(state[key].shape)} in the checkpoint but {tuple(shape)} in the model"
    extra = [k for k in state if k not in expected]
    if extra:
        return (
            f"key {extra[0]} (shape {tuple(state[extra[0]].shape)}) is in the checkpoint but not in the model"
        )
    return None


def adm_config_for(
    state: dict[str, Tensor], preset: str | None = None, **overrides: Any
) -> tuple[ADMConfig, str | None]:
    """(the ADM config, None) for ``state``, or (the closest config, the first mismatch) when none fits.

    With ``preset`` only that preset (plus ``overrides``) is tried; without, every entry of
    :data:`ADM_PRESETS` is, and the one with ``state``'s key count is the "closest" for the message.
    """
    names = [preset] if preset else list(ADM_PRESETS)
    candidates = []
    for name in names:
        if name not in ADM_PRESETS:
            raise ValueError(f"unknown ADM preset {name!r}; choose from {sorted(ADM_PRESETS)}")
        config = ADMConfig(**{**ADM_PRESETS[name], **overrides})
        expected = expected_shapes(config)
        problem = first_mismatch(expected, state)
        if problem is None:
            return config, None
        candidates.append((abs(len(expected) - len(state)), config, f"{problem} (preset {name})"))
    _, config, problem = min(candidates, key=lambda c: c[0])
    return config, problem


def build_openai_model(state: dict[str, Tensor], config: ADMConfig, kind: str) -> EDMPrecond | CMPrecond:
    """The EDM teacher (``kind="edm"``) or consistency model (``kind="cm"``) of a released state dict; eval mode.

    ``state`` must fit ``config`` exactly (see :func:`adm_config_for`); loading is ``strict=True``.
    """
    if kind not in ("edm", "cm"):
        raise ValueError(f"kind must be 'edm' or 'cm', got {kind!r}")
    with torch.device("meta"):  # no throwaway random init of up to 0.5 G parameters
        backbone = ADM(config)
    backbone.load_state_dict(state, strict=True, assign=True)
    cls = EDMPrecond if kind == "edm" else CMPrecond
    return cls(backbone, c_noise_scale=C_NOISE_SCALE, **SIGMAS).eval()
