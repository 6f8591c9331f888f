"""Image-array helpers: resizing, flips, the dataset content digest and sample grids as PNG.

Arrays are uint8 (N, C, H, W) with C = 1 (grey) or 3 (RGB), the layout every cmflow stage exchanges.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

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


def grid_image(images: np.ndarray, cols: int = 8, *, min_tile: int = 32, pad: int = 2) -> np.ndarray:
    """Tile uint8 (N, C, H, W) images into one (rows, cols) grid array of shape (H', W', C).

    Each image is upscaled by the smallest integer s with s * max(H, W) >= ``min_tile`` (nearest neighbour,
    so 8x8 digits stay crisp) and tiles are separated by ``pad`` pixels of mid grey, so neighbouring images
    never run together. ``cols`` is capped by the number of images.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
    n, c, h, w = images.shape
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * scale, w * scale
    grid = np.full((rows * th + (rows - 1) * pad, cols * tw + (cols - 1) * pad, c), 128, dtype=np.uint8)
    tiles = images.repeat(scale, axis=2).repeat(scale, axis=3).transpose(0, 2, 3, 1)  # (N, H s, W s, C)
    for i, tile in enumerate(tiles):
        top, left = (i // cols) * (th + pad), (i % cols) * (tw + pad)
        grid[top : top + th, left : left + tw] = tile
    return grid


def save_grid(images: np.ndarray, path: str | Path, cols: int = 8) -> None:
    """Write uint8 (N, C, H, W) images (grey or RGB) as a PNG grid of ``cols`` columns (deterministic bytes)."""
    from PIL import Image

    grid = grid_image(images, cols)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
        str(path), format="PNG", optimize=False
    )
