"""What one Ray task of ``evaluate`` measures, and how the pieces merge into one seed's numbers.

A :class:`Work` item is a contiguous slice of one setting's images at one seed: generated from sample seeds
``[start, stop)`` by a network (the one sampling path, :mod:`cmflow.diffusion.generate`), or rows
``[start, stop)`` of a dataset artifact (the real images, or reused teacher samples). The task embeds them
with the feature extractor and returns a :class:`Piece`: float64 feature sums about a shift shared by all
pieces of the quantity (the reference mean for generated images), the feature rows the rank-based
metrics need (KID, precision/recall, FID-infinity), and the first images for the grid. :func:`merge`
adds the sums and concatenates the rows in slice order, so the statistics of a seed are those of one
task to float64 rounding for any number of tasks, and -- sample seeds being per sample -- independent of
the batch size and the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cmflow.stage import Artifact

_CACHE: dict[tuple[str, str], Any] = {}  # per task process: loaded networks and extractors by weights sha


@dataclass(frozen=True)
class NetRef:
    """A network for the tasks: its weights (an object-store reference, or bytes) and ``model.json``."""

    weights: Any
    config: dict[str, Any]
    sha256: str


@dataclass(frozen=True)
class ExtractorRef:
    name: str
    weights: Any  # an object-store reference, bytes, or None for the shipped digits net
    sha256: str


@dataclass(frozen=True)
class Work:
    """One task: images [start, stop) of a setting -- sampled by ``net`` or read from ``rows`` -- embedded."""

    extractor: ExtractorRef
    start: int
    stop: int
    net: NetRef | None = None
    sampling: dict[str, Any] = field(
        default_factory=dict
    )  # method, num_steps, sigmas, dtype, shape, num_classes
    rows: Artifact | None = None  # a dataset artifact whose rows [start, stop) are the images
    shift: Any = None  # float64 (D,): the shift of the feature sums (None: the piece's own first batch)
    keep: Any = True  # True: keep every feature row; an int64 array: keep rows at these offsets; False: none
    grid: int = 0  # return the first ``grid`` images
    batch_size: int = 1000
    feature_batch: int = 1000
    gpus: float = 0.0


@dataclass
class Piece:
    stats: Any  # cmflow.metrics.stats.FeatureStats
    features: np.ndarray  # float32 (K, D)
    grid: np.ndarray  # uint8 (G, C, H, W)


def _cached(kind: str, sha: str, build: Any) -> Any:
    key = (kind, sha)
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = build()
    return _CACHE[key]


def _value(ref: Any) -> Any:
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def load_net(ref: NetRef, device: str) -> Any:
    from cmflow.models.io import load_model

    model = _cached("net", ref.sha256, lambda: load_model(_value(ref.weights), ref.config).eval())
    return model.to(device).requires_grad_(False)


def load_extractor(ref: ExtractorRef, device: str) -> Any:
    from cmflow.metrics.extractors import load_extractor as build

    extractor = _cached("extractor", ref.sha256, lambda: build(ref.name, _value(ref.weights)))
    return extractor.to(device)


def _images(work: Work, device: str) -> Any:
    """The work's images in batches (uint8, CPU)."""
    if work.rows is not None:
        from cmflow.data.shards import DatasetInfo, read_rows

        info = DatasetInfo.parse(work.rows.read_bytes("dataset.json"))
        images, _ = read_rows(work.rows.read_bytes, info, work.start, work.stop)
        for a in range(0, images.shape[0], work.batch_size):
            yield images[a : a + work.batch_size]
        return
    import torch

    from cmflow.diffusion.generate import batch_ranges, sample_images

    assert work.net is not None
    model = load_net(work.net, device)
    sampling = dict(work.sampling)
    dtype = torch.float64 if sampling.pop("dtype", "float64") == "float64" else torch.float32
    for seeds in batch_ranges(work.start, work.stop - work.start, work.batch_size):
        images, _ = sample_images(model, seeds, dtype=dtype, **sampling)
        yield images


def measure(work: Work) -> Piece:
    """Inside a task: the work's images -> feature sums, kept feature rows, grid images."""
    import torch

    from cmflow.distributed.tasks import task_device
    from cmflow.metrics.stats import FeatureStats

    device = task_device(work.gpus)
    extractor = load_extractor(work.extractor, device)
    stats = FeatureStats(extractor.num_features, shift=work.shift)
    grid: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    offset = 0
    for images in _images(work, device):
        images = np.ascontiguousarray(images)
        if len(grid) < work.grid:
            grid.extend(images[: work.grid - len(grid)])
        for a in range(0, images.shape[0], work.feature_batch):
            batch = torch.from_numpy(images[a : a + work.feature_batch])
            features = extractor(batch).detach().to("cpu", torch.float64).numpy()  # (b, D)
            stats.update(features)
            if isinstance(work.keep, np.ndarray):
                lo = offset + a
                want = work.keep[(work.keep >= lo) & (work.keep < lo + features.shape[0])] - lo
                kept.append(features[want].astype(np.float32))
            elif work.keep:
                kept.append(features.astype(np.float32))
        offset += images.shape[0]
    rows = np.concatenate(kept) if kept else np.zeros((0, extractor.num_features), np.float32)
    return Piece(stats, rows, np.stack(grid) if grid else np.zeros((0, 1, 1, 1), np.uint8))


def merge(pieces: list[Piece]) -> Piece:
    """The pieces of one quantity, in slice order, as one."""
    stats = pieces[0].stats
    for piece in pieces[1:]:
        stats = stats.merge(piece.stats)
    features = np.concatenate([p.features for p in pieces])
    grids = [p.grid for p in pieces if p.grid.shape[0]]
    return Piece(stats, features, grids[0] if grids else pieces[0].grid)
