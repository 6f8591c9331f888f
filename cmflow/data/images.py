"""Image-array helpers: uint8 <-> [-1, 1] floats, resizing, flips and the dataset content digest.

Arrays are uint8 (N, C, H, W) with C = 1 (grey) or 3 (RGB), the layout every cmflow stage exchanges.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cmflow.errors import InputError


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    """``images`` as a C-contiguous uint8 (N, C, H, W) array with C in (1, 3) and H == W, or InputError."""
    if images.dtype != np.uint8:
        raise InputError(f"{what}: images must be uint8 in [0, 255], got {images.dtype}; convert them first")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"{what}: images must have shape (N, C, H, W) with C = 1 or 3, got {images.shape}")
    if images.shape[0] == 0:
        raise InputError(f"{what}: holds no images; point the source at a non-empty dataset")
    if images.shape[2] != images.shape[3]:
        raise InputError(
            f"{what}: images are {images.shape[2]}x{images.shape[3]}, not square; set params.resolution to "
            "centre-crop and resize them"
        )
    return np.ascontiguousarray(images)


def resize_images(images: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop to a square, then resize every image to ``resolution`` (Pillow, Lanczos); uint8 NCHW."""
    from PIL import Image

    n, c, h, w = images.shape
    if h == w == resolution:
        return images
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    out = np.empty((n, c, resolution, resolution), dtype=np.uint8)
    for i in range(n):
        tile = images[i, :, top : top + side, left : left + side]
        pil = Image.fromarray(tile[0] if c == 1 else tile.transpose(1, 2, 0))
        pil = pil.resize((resolution, resolution), Image.Resampling.LANCZOS)
        arr = np.asarray(pil)
        out[i] = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return out


def with_hflips(images: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Append a horizontally mirrored copy of every image (EDM's x-flip augmentation, done once here)."""
    flipped = images[..., ::-1]
    out = np.ascontiguousarray(np.concatenate([images, flipped], axis=0))
    return out, (np.concatenate([labels, labels]) if labels is not None else None)


def dataset_digest(images: np.ndarray, labels: np.ndarray | None) -> str:
    """sha256 over the uint8 image bytes (C order) followed by the int64 little-endian label bytes."""
    digest = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return digest.hexdigest()


def to_float(images: Any) -> Any:
    """uint8 tensor/array in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images.float() / 127.5 - 1 if hasattr(images, "float") else images.astype(np.float32) / 127.5 - 1


def to_uint8(x: Any) -> Any:
    """float tensor in [-1, 1] -> uint8 tensor, rounding: ((x + 1) 127.5).round().clamp(0, 255)."""
    import torch

    return ((x.to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
