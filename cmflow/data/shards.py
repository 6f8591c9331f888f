"""The dataset artifact format shared by ``prepare_data`` and ``teacher_sample``.

Files in the artifact folder::

    images.npy                  uint8 (N, C, H, W), or, above SHARD_BYTES,
    images-00000.npy, ...       consecutive shards of the same array
    labels.npy                  int64 (N,), only when the dataset has labels
    dataset.json                {"source", "num_images", "channels", "resolution", "num_classes", "digest",
                                 "image_files", "has_labels"}

``digest`` is :func:`cmflow.data.images.dataset_digest` (sha256 of the image bytes, then the label bytes).
Everything is written with ``allow_pickle=False`` and read the same way.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cmflow.data.images import check_images, dataset_digest
from cmflow.errors import InputError

DATASET_JSON = "dataset.json"
SHARD_BYTES = 256 * 2**20


def write_dataset(
    out_dir: Path,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    source: str,
    num_classes: int,
    shard_bytes: int = SHARD_BYTES,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write images (one file or shards), labels and ``dataset.json`` into ``out_dir``; returns the info."""
    images = check_images(images, source)
    per_image = int(np.prod(images.shape[1:]))
    per_shard = max(1, shard_bytes // per_image)
    if images.shape[0] <= per_shard:
        names = ["images.npy"]
        np.save(out_dir / "images.npy", images, allow_pickle=False)
    else:
        names = []
        for index, start in enumerate(range(0, images.shape[0], per_shard)):
            names.append(f"images-{index:05d}.npy")
            np.save(out_dir / names[-1], images[start : start + per_shard], allow_pickle=False)
    if labels is not None:
        np.save(out_dir / "labels.npy", np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)
    info = {
        "source": source,
        "num_images": int(images.shape[0]),
        "channels": int(images.shape[1]),
        "resolution": int(images.shape[2]),
        "num_classes": int(num_classes),
        "digest": dataset_digest(images, labels),
        "image_files": names,
        "has_labels": labels is not None,
        **(extra or {}),
    }
    (out_dir / DATASET_JSON).write_text(json.dumps(info, indent=1, sort_keys=True))
    return info


def dataset_meta(info: dict[str, Any]) -> dict[str, Any]:
    """The stage meta of a dataset artifact: {num_images, channels, resolution, num_classes, digest}."""
    return {k: info[k] for k in ("num_images", "channels", "resolution", "num_classes", "digest")}


def _npy(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"dataset file {name} is not a readable .npy array ({exc})") from None


def read_dataset(read_bytes: Callable[[str], bytes]) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(images, labels or None, dataset.json) of a dataset artifact; ``read_bytes`` is e.g. ``Artifact.read_bytes``."""
    info = json.loads(read_bytes(DATASET_JSON))
    images = np.concatenate([_npy(read_bytes(name), name) for name in info["image_files"]])
    labels = _npy(read_bytes("labels.npy"), "labels.npy") if info.get("has_labels") else None
    return check_images(images, "dataset artifact"), labels, info
