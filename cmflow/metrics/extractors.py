"""Feature extractors behind one small interface, an explicit table of them, and a streaming stats helper.

An extractor takes **uint8 (B, C, H, W)** images in [0, 255] (C = 1 or 3) and returns float32 features
(B, num_features); it converts its input as it needs (grey -> RGB for Inception, [-1, 1] scaling, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from cmflow.metrics.digits_net import DigitsNet, load_digits_net, uint8_to_input
from cmflow.metrics.inception import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_SHA256_PREFIX,
    FIDInceptionV3,
    build_fid_inception,
    load_inception_weights,
)
from cmflow.metrics.stats import FeatureStats

__all__ = [
    "EXTRACTORS",
    "DigitsExtractor",
    "FeatureExtractor",
    "InceptionExtractor",
    "compute_stats",
    "load_extractor",
]

WeightsArg = bytes | str | os.PathLike[str] | None


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the evaluate stage needs from a feature network."""

    name: str
    num_features: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) in [0, 255] -> float32 (B, num_features)."""
        ...

    def to(self, device: str | torch.device) -> FeatureExtractor:
        """Move to ``device``; returns self."""
        ...


def _check_uint8(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8:
        raise TypeError(
            f"extractors take uint8 images in [0, 255], got {images.dtype}; quantise first, "
            "e.g. ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)"
        )
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    return images


class _ModuleExtractor:
    """Shared plumbing: holds an eval-mode module, its device and the weights' sha256."""

    name: str
    num_features: int

    def __init__(self, module: torch.nn.Module, weights_sha256: str, device: str | torch.device) -> None:
        self.module = module.eval().requires_grad_(False)
        self.weights_sha256 = weights_sha256
        self.device = torch.device(device)
        self.module.to(self.device)

    def to(self, device: str | torch.device) -> _ModuleExtractor:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def __repr__(self) -> str:
        sha = self.weights_sha256[:12]
        return f"{type(self).__name__}(name={self.name!r}, sha256={sha}, device={self.device})"


class DigitsExtractor(_ModuleExtractor):
    """Penultimate-layer features of the shipped 8x8 digits classifier (grey 1x8x8 input only)."""

    name = "digits"

    def __init__(self, net: DigitsNet, weights_sha256: str, device: str | torch.device = "cpu") -> None:
        super().__init__(net, weights_sha256, device)
        self.net = net
        self.num_features = net.feature_dim

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_uint8(images)
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(
                f"the digits extractor takes grey 8x8 images (B, 1, 8, 8), got {tuple(images.shape)}"
            )
        return self.net.features(uint8_to_input(images.to(self.device))).float()


class InceptionExtractor(_ModuleExtractor):
    """2048-d pool3 features of the TF-2015-12-05 Inception-v3 (legacy-TF resize to 299)."""

    name = "inception-v3"
    num_features = 2048

    def __init__(self, net: FIDInceptionV3, weights_sha256: str, device: str | torch.device = "cpu") -> None:
        super().__init__(net, weights_sha256, device)
        self.net = net

    @property
    def is_standard_fid_weights(self) -> bool:
        """True if the loaded file's sha256 starts with the hash in the standard file's name."""
        return self.weights_sha256.startswith(FID_WEIGHTS_SHA256_PREFIX)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_uint8(images).to(self.device)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images.float()).float()


def load_digits_extractor(weights: WeightsArg = None, device: str | torch.device = "cpu") -> DigitsExtractor:
    """The digits extractor; ``weights=None`` uses the shipped package file (sha256-verified)."""
    net, sha = load_digits_net(weights)
    return DigitsExtractor(net, sha, device)


def load_inception_extractor(
    weights: WeightsArg = None, device: str | torch.device = "cpu"
) -> InceptionExtractor:
    """The FID Inception extractor. ``weights`` (bytes or a local path) is required: nothing is downloaded."""
    if weights is None:
        raise ValueError(
            "the inception-v3 extractor needs the standard FID weights file "
            f"{FID_WEIGHTS_FILENAME} (pytorch-fid's port of the TF 2015-12-05 Inception); nothing is "
            "downloaded at run time. Put the file in your store and pass its bytes or a local path, e.g. set "
            f"`fid.weights_uri: s3://<bucket>/weights/{FID_WEIGHTS_FILENAME}` in the spec."
        )
    net = build_fid_inception()
    sha = load_inception_weights(net, weights)
    return InceptionExtractor(net, sha, device)


#: name -> loader(weights, device). Explicit on purpose: grep for a name to find its code.
EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "digits": load_digits_extractor,
    "inception-v3": load_inception_extractor,
}


def load_extractor(
    name: str, weights: WeightsArg = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """Build the extractor called ``name`` (see :data:`EXTRACTORS`) on ``device``."""
    try:
        loader = EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {sorted(EXTRACTORS)}") from None
    return loader(weights, device)


# -- streaming statistics ------------------------------------------------------------------------------------


def _as_uint8_tensor(batch: Any) -> torch.Tensor:
    t = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
    if t.ndim == 3:  # (B, H, W) grey
        t = t.unsqueeze(1)
    return t


def _batches(images: Any, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, np.ndarray | torch.Tensor):
        for start in range(0, images.shape[0], batch_size):
            yield _as_uint8_tensor(images[start : start + batch_size])
        return
    for batch in images:
        t = _as_uint8_tensor(batch)
        for start in range(0, t.shape[0], batch_size):
            yield t[start : start + batch_size]


def compute_stats(
    extractor: FeatureExtractor,
    images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    batch_size: int = 256,
    keep_features: bool | int = False,
    on_batch: Callable[[int], None] | None = None,
) -> FeatureStats:
    """Stream ``images`` through ``extractor`` and accumulate float64 :class:`FeatureStats`.

    Args:
        extractor: any :class:`FeatureExtractor`.
        images: a uint8 (N, C, H, W) array/tensor, or an iterable of such batches (any sizes; re-chunked to at
            most ``batch_size``). (N, H, W) grey arrays are accepted too.
        batch_size: images per extractor call.
        keep_features: passed to :class:`FeatureStats` (rows kept for KID / precision-recall).
        on_batch: called after each batch with the number of images in it (e.g. ``progress.update``).
    """
    stats = FeatureStats(extractor.num_features, keep_features=keep_features)
    for batch in _batches(images, batch_size):
        if batch.shape[0] == 0:
            continue
        stats.update(extractor(batch))
        if on_batch is not None:
            on_batch(int(batch.shape[0]))
    return stats
