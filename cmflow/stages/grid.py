"""Sample grids as PNG files (a quick look at a model until the evaluate stage reports FID)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def grid_image(images: np.ndarray, cols: int = 8, min_tile: int = 32) -> np.ndarray:
    """Tile uint8 (N, C, H, W) images into one (rows H s, cols W s, C) array, upscaled by s >= 1 (nearest)."""
    n, c, h, w = images.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    rows = math.ceil(n / cols)
    tiles = np.zeros((rows * cols, c, h, w), dtype=np.uint8)
    tiles[:n] = images
    tiles = tiles.repeat(scale, axis=2).repeat(scale, axis=3)
    grid = tiles.reshape(rows, cols, c, h * scale, w * scale).transpose(0, 3, 1, 4, 2)
    return grid.reshape(rows * h * scale, cols * w * scale, c)


def save_grid(images: np.ndarray, path: str | Path, cols: int = 8) -> None:
    """Write ``images`` (uint8 NCHW, grey or RGB) as a PNG grid of ``cols`` columns (deterministic bytes)."""
    from PIL import Image

    grid = grid_image(images, cols)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    picture.save(path, format="PNG", optimize=False)
