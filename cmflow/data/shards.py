"""The dataset artifact format: fixed-size uint8 shards plus ``dataset.json``, written and read in streams.

Files in the artifact folder::

    shards/images-00000.npy   uint8 (n, C, H, W); every shard holds ``shard_images`` images but the last
    shards/labels-00000.npy   int64 (n,), only when the dataset has labels
    dataset.json              {"format": 2, "source", "num_images", "channels", "resolution", "num_classes",
                               "digest", "has_labels", "shard_images",
                               "shards": [{"images": ..., "labels": ... | null, "count": n}, ...], ...}

``digest`` is :func:`cmflow.data.images.dataset_digest` of the whole dataset in shard order (sha256 of all
image bytes, then all label bytes), computed while the shards stream through :class:`ShardWriter`, which
never holds more than one shard. Readers take one shard at a time (:func:`read_shard`, :func:`iter_shards`);
:func:`read_dataset` concatenates them for the small datasets that fit in memory. Everything is written
with ``allow_pickle=False`` and read the same way; a missing, truncated or foreign shard is an
:class:`~cmflow.errors.InputError` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmflow.data.images import check_images
from cmflow.errors import CmflowError, InputError

__all__ = [
    "DATASET_JSON",
    "SHARD_BYTES",
    "DatasetInfo",
    "ShardWriter",
    "dataset_meta",
    "images_per_shard",
    "iter_shards",
    "read_dataset",
    "read_info",
    "read_rows",
    "read_shard",
    "write_dataset",
]

DATASET_JSON = "dataset.json"
FORMAT = 2
SHARD_BYTES = 64 * 2**20  # default shard size: ~64 MiB of uint8 pixels
ReadBytes = Callable[[str], bytes]
_FIX = "run the pipeline again: its cache check recomputes a damaged dataset artifact"


def images_per_shard(image_shape: tuple[int, int, int], shard_bytes: int = SHARD_BYTES) -> int:
    """How many (C, H, W) uint8 images make a shard of about ``shard_bytes``."""
    return max(1, shard_bytes // int(np.prod(image_shape)))


@dataclass(frozen=True)
class DatasetInfo:
    """A parsed, checked ``dataset.json``."""

    raw: dict[str, Any]

    @classmethod
    def parse(cls, data: bytes | dict[str, Any], where: str = "the dataset artifact") -> DatasetInfo:
        try:
            raw = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{where}: {DATASET_JSON} is not valid JSON ({exc}); {_FIX}") from None
        if raw.get("format") != FORMAT or not isinstance(raw.get("shards"), list):
            raise InputError(
                f"{where}: {DATASET_JSON} is not a sharded dataset of format {FORMAT} (an older cmflow wrote "
                "it?); re-run prepare_data"
            )
        counts = [int(s.get("count", 0)) for s in raw["shards"]]
        if not counts or min(counts) < 1 or sum(counts) != int(raw.get("num_images", -1)):
            raise InputError(f"{where}: {DATASET_JSON} lists shards that do not add up to num_images; {_FIX}")
        return cls(raw)

    @property
    def num_images(self) -> int:
        return int(self.raw["num_images"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return int(self.raw["channels"]), int(self.raw["resolution"]), int(self.raw["resolution"])

    @property
    def has_labels(self) -> bool:
        return bool(self.raw.get("has_labels"))

    @property
    def num_classes(self) -> int:
        return int(self.raw.get("num_classes", 0) or 0)

    @property
    def digest(self) -> str:
        return str(self.raw["digest"])

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(int(s["count"]) for s in self.raw["shards"])

    @property
    def files(self) -> list[str]:
        names = []
        for shard in self.raw["shards"]:
            names.append(shard["images"])
            if shard.get("labels"):
                names.append(shard["labels"])
        return names


def dataset_meta(info: dict[str, Any] | DatasetInfo) -> dict[str, Any]:
    """The stage meta of a dataset artifact: {num_images, channels, resolution, num_classes, digest}."""
    raw = info.raw if isinstance(info, DatasetInfo) else info
    return {k: raw[k] for k in ("num_images", "channels", "resolution", "num_classes", "digest")}


class ShardWriter:
    """Write images (and labels) as fixed-size shards while hashing them; holds at most one shard.

    ``add`` takes batches in dataset order; ``close`` writes the last shard and ``dataset.json``.
    """

    def __init__(self, out_dir: Path, shard_images: int | None = None, *, has_labels: bool) -> None:
        self.out_dir = Path(out_dir)
        (self.out_dir / "shards").mkdir(parents=True, exist_ok=True)
        self.shard_images = shard_images
        self.has_labels = has_labels
        self.shape: tuple[int, ...] | None = None
        self.shards: list[dict[str, Any]] = []
        self._images: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pending = 0
        self._hash = hashlib.sha256()
        self._all_labels: list[np.ndarray] = []  # int64, hashed after the images (8 bytes per image)

    def add(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        images = check_images(np.asarray(images), "dataset batch")
        if self.shape is None:
            self.shape = tuple(images.shape[1:])
            self.shard_images = self.shard_images or images_per_shard(self.shape)  # type: ignore[arg-type]
        elif tuple(images.shape[1:]) != self.shape:
            raise InputError(f"images of shape {images.shape[1:]} follow images of shape {self.shape}")
        if self.has_labels != (labels is not None):
            raise ValueError("labels must be given with every batch or with none")
        if labels is not None:
            labels = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)
            if labels.shape[0] != images.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
        start = 0
        while start < images.shape[0]:
            take = min(images.shape[0] - start, int(self.shard_images) - self._pending)  # type: ignore[arg-type]
            self._images.append(images[start : start + take])
            if labels is not None:
                self._labels.append(labels[start : start + take])
            self._pending += take
            start += take
            if self._pending == self.shard_images:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self.shards)
        images = np.ascontiguousarray(np.concatenate(self._images))
        entry: dict[str, Any] = {
            "images": f"shards/images-{index:05d}.npy",
            "labels": None,
            "count": self._pending,
        }
        np.save(self.out_dir / entry["images"], images, allow_pickle=False)
        self._hash.update(images.tobytes())
        if self.has_labels:
            labels = np.concatenate(self._labels)
            entry["labels"] = f"shards/labels-{index:05d}.npy"
            np.save(self.out_dir / entry["labels"], labels, allow_pickle=False)
            self._all_labels.append(labels)
        self.shards.append(entry)
        self._images, self._labels, self._pending = [], [], 0

    def close(self, *, source: str, num_classes: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the last shard and ``dataset.json``; returns its content."""
        self._flush()
        if not self.shards or self.shape is None:
            raise InputError("the source holds no images; point it at a non-empty dataset")
        for labels in self._all_labels:
            self._hash.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
        info = {
            "format": FORMAT,
            "source": source,
            "num_images": sum(s["count"] for s in self.shards),
            "channels": int(self.shape[0]),
            "resolution": int(self.shape[1]),
            "num_classes": int(num_classes),
            "digest": self._hash.hexdigest(),
            "has_labels": self.has_labels,
            "shard_images": int(self.shard_images),  # type: ignore[arg-type]
            "shards": self.shards,
            **(extra or {}),
        }
        (self.out_dir / DATASET_JSON).write_text(json.dumps(info, indent=1, sort_keys=True))
        return info


def write_dataset(
    out_dir: Path,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    source: str,
    num_classes: int,
    shard_images: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an in-memory dataset (teacher samples, small sources) as shards; returns ``dataset.json``."""
    writer = ShardWriter(out_dir, shard_images, has_labels=labels is not None)
    writer.add(images, labels)
    return writer.close(source=source, num_classes=num_classes, extra=extra)


def _npy(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"dataset file {name} is not a readable .npy array ({exc}); {_FIX}") from None


def _read(read_bytes: ReadBytes, name: str) -> bytes:
    try:
        return read_bytes(name)
    except FileNotFoundError:
        raise InputError(f"dataset shard {name} is missing from the store; {_FIX}") from None
    except CmflowError as exc:  # a sha256 mismatch, or a file the manifest does not list
        raise InputError(f"dataset shard {name} is damaged or missing ({exc}); {_FIX}") from None


def read_shard(read_bytes: ReadBytes, info: DatasetInfo, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels or None) of shard ``index``, checked against ``dataset.json``."""
    entry = info.raw["shards"][index]
    images = _npy(_read(read_bytes, entry["images"]), entry["images"])
    if images.dtype != np.uint8 or images.shape != (entry["count"], *info.shape):
        raise InputError(
            f"dataset shard {entry['images']} holds {images.dtype} {images.shape}, not uint8 "
            f"{(entry['count'], *info.shape)}; {_FIX}"
        )
    labels = None
    if info.has_labels:
        labels = _npy(_read(read_bytes, entry["labels"]), entry["labels"])
        if labels.shape != (entry["count"],) or labels.dtype != np.int64:
            raise InputError(
                f"dataset shard {entry['labels']} does not hold {entry['count']} int64 labels; {_FIX}"
            )
    return np.ascontiguousarray(images), labels


def iter_shards(read_bytes: ReadBytes, info: DatasetInfo) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    for index in range(len(info.raw["shards"])):
        yield read_shard(read_bytes, info, index)


def read_rows(
    read_bytes: ReadBytes, info: DatasetInfo, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows [start, stop) of the dataset in shard order, reading only the shards that hold them."""
    images, labels = [], []
    first = 0
    for index, count in enumerate(info.shard_sizes):
        lo, hi = max(start, first), min(stop, first + count)
        if lo < hi:
            shard_images, shard_labels = read_shard(read_bytes, info, index)
            images.append(shard_images[lo - first : hi - first])
            if shard_labels is not None:
                labels.append(shard_labels[lo - first : hi - first])
        first += count
        if first >= stop:
            break
    if not images:
        raise InputError(f"rows {start}..{stop} lie outside the dataset's {info.num_images} images")
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def read_info(read_bytes: ReadBytes, where: str = "the dataset artifact") -> DatasetInfo:
    return DatasetInfo.parse(_read(read_bytes, DATASET_JSON), where)


def read_dataset(read_bytes: ReadBytes) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(images, labels or None, dataset.json) of a whole dataset artifact, for datasets that fit in memory."""
    info = read_info(read_bytes)
    parts = list(iter_shards(read_bytes, info))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]) if info.has_labels else None  # type: ignore[misc]
    return images, labels, info.raw
