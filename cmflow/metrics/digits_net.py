"""A small classifier for 8x8 grey digits whose penultimate layer gives FID features.

conv3x3(32) -> SiLU -> conv3x3(64) -> SiLU -> maxpool2 -> linear(1024 -> D) = **features**
-> SiLU -> linear(10).

The features are the *pre-activation* of the D-unit layer. A ReLU there produced always-zero units in the
prototype (digits-prototype.md), which made the real covariance singular; an affine map of a 1024-d SiLU
representation has no such dead units (see the measurement recorded in ``weights/digits_features.json``).
SiLU is also used in the conv layers so no conv channel can die.

Input convention: uint8 (B, 1, 8, 8) in [0, 255]. sklearn's digits (0..16) map to uint8 by
:func:`digits_to_uint8` (round(v * 255 / 16)); the shipped weights were trained on exactly that.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmflow.metrics.inception import read_state_dict

__all__ = [
    "DIGITS_WEIGHTS_FILE",
    "DIGITS_WEIGHTS_META",
    "DigitsNet",
    "digits_to_uint8",
    "load_digits_net",
    "shipped_digits_meta",
    "uint8_to_input",
]

DIGITS_WEIGHTS_FILE = "digits_features.safetensors"
DIGITS_WEIGHTS_META = "digits_features.json"
IMAGE_SIZE = 8


def digits_to_uint8(images: Any) -> np.ndarray:
    """sklearn digits (N, 8, 8) or (N, 64) with values 0..16 -> uint8 (N, 1, 8, 8) in [0, 255]."""
    x = np.asarray(images, dtype=np.float64).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return np.clip(np.round(x * (255.0 / 16.0)), 0, 255).astype(np.uint8)


def uint8_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, 8, 8) in [0, 255] -> float32 in [-1, 1], the network's input."""
    return images.to(torch.float32) / 127.5 - 1.0


class DigitsNet(nn.Module):
    """Digits classifier; :meth:`features` is the FID embedding (B, feature_dim)."""

    def __init__(
        self, feature_dim: int = 64, channels: tuple[int, int] = (32, 64), num_classes: int = 10
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.feature_dim = feature_dim
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.fc_features = nn.Linear(c2 * (IMAGE_SIZE // 2) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Float input (B, 1, 8, 8) in [-1, 1] -> pre-activation features (B, feature_dim)."""
        h = F.silu(self.conv1(x))  # (B, c1, 8, 8)
        h = F.silu(self.conv2(h))  # (B, c2, 8, 8)
        h = F.max_pool2d(h, 2).flatten(1)  # (B, c2 * 16)
        return self.fc_features(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float input in [-1, 1] -> class logits (B, num_classes)."""
        return self.head(F.silu(self.features(x)))

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> DigitsNet:
        """Build a net whose sizes are read off the state dict's shapes, and load it (strict)."""
        c1 = state_dict["conv1.weight"].shape[0]
        c2 = state_dict["conv2.weight"].shape[0]
        feature_dim, num_classes = state_dict["head.weight"].shape[1], state_dict["head.weight"].shape[0]
        net = cls(feature_dim=feature_dim, channels=(c1, c2), num_classes=num_classes)
        net.load_state_dict(state_dict, strict=True)
        return net.eval()


def _weights_dir() -> Any:  # importlib.resources Traversable
    return resources.files("cmflow.metrics").joinpath("weights")


def shipped_digits_meta() -> dict[str, Any]:
    """The JSON record that ships next to the digits weights (sha256, accuracy, training details)."""
    return json.loads(_weights_dir().joinpath(DIGITS_WEIGHTS_META).read_text())


def load_digits_net(weights: bytes | str | os.PathLike[str] | None = None) -> tuple[DigitsNet, str]:
    """Load :class:`DigitsNet` from weights bytes or a local path; ``None`` = the shipped package file.

    ``weights`` may be safetensors or a ``torch.save``'d plain state dict (read with ``weights_only=True``).
    The shipped file is verified against the sha256 recorded in its JSON (``ValueError`` on mismatch).
    Returns ``(net in eval mode, sha256 of the weights bytes)``.
    """
    if weights is None:
        data = _weights_dir().joinpath(DIGITS_WEIGHTS_FILE).read_bytes()
        expected = shipped_digits_meta()["sha256"]
        sha = hashlib.sha256(data).hexdigest()
        if sha != expected:
            raise ValueError(
                f"shipped digits weights are corrupt: sha256 {sha} != recorded {expected}; "
                "retrain with `python scripts/train_digits_net.py --out cmflow/metrics/weights`"
            )
        weights = data
    state_dict, sha = read_state_dict(weights)
    return DigitsNet.from_state_dict(state_dict), sha
