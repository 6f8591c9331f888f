"""Reference statistics of a dataset, computed once and cached as a write-once artifact in the store.

The artifact (kind ``fid_reference``) lives at ``artifacts/fid_reference/<k[:2]>/<k>/`` where ``k`` is the
sha256 hex of :func:`cmflow.metrics.reference.reference_key` for (dataset digest, extractor name, image
resolution, extractor weights sha256): any evaluate stage, pipeline or run that needs the same reference
finds it there, and retrained or different extractor weights never reuse stale statistics. Files::

    stats.npz       mu (D,), sigma (D, D) float64, n, meta   (cmflow.metrics.reference.stats_to_bytes)
    features.npy    float32 (K, D): features of K real images (all of them, or a fixed random subset of
                    REF_MAX_FEATURES), for KID and precision/recall

The images are fed through the extractor in a fixed pseudo-random order (numpy ``default_rng(0)``), so the
kept features are an unbiased subset even when the dataset is sorted by class; FID's moments do not depend on
the order. A concurrent second writer adopts the first one's commit (:meth:`cmflow.storage.Storage.commit`).
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmflow.metrics.reference import (
    ReferenceStats,
    reference_key,
    stats_digest,
    stats_from_bytes,
    stats_to_bytes,
)

__all__ = [
    "REFERENCE_KIND",
    "REF_MAX_FEATURES",
    "Reference",
    "get_reference",
    "lookup_reference",
    "reference_cache_key",
]

REFERENCE_KIND = "fid_reference"
#: real feature rows kept for KID / precision-recall (50k x 2048 float32 would be 400 MB; 20k is 160 MB).
REF_MAX_FEATURES = 20_000
STATS_FILE = "stats.npz"
FEATURES_FILE = "features.npy"
_ORDER_SEED = 0


@dataclass(frozen=True)
class Reference:
    """Reference statistics and real features read back from (or just written to) the store."""

    stats: ReferenceStats
    features: np.ndarray  # float32 (K, D)
    key: str  # the readable reference_key, e.g. fid-ref-digits-8x8-<hash16>
    cache_key: str  # sha256 hex of ``key``: the artifact's cache key
    digest: str  # sha256 of stats.npz (stable: the bytes are deterministic)
    attempt: str  # the committed attempt id (unchanged on a cache hit)
    uri: str
    hit: bool  # True when found in the store, False when computed by this call

    def summary(self) -> dict[str, Any]:
        """JSON-able description for reports."""
        return {
            "key": self.key,
            "cache_key": self.cache_key,
            "stats_digest": self.digest,
            "num_images": int(self.stats.n),
            "num_features": int(self.stats.mu.shape[0]),
            "features_kept": int(self.features.shape[0]),
            "cache_hit": self.hit,
            **{
                k: self.stats.meta[k]
                for k in ("dataset_digest", "resolution", "extractor")
                if k in self.stats.meta
            },
        }


def reference_cache_key(key: str) -> str:
    """The artifact cache key of a reference: sha256 hex of its :func:`reference_key` string."""
    return hashlib.sha256(key.encode()).hexdigest()


def _key_for(dataset_digest: str, extractor: Any, resolution: int | tuple[int, int]) -> str:
    return reference_key(
        dataset_digest, extractor.name, resolution, extractor_digest=extractor.weights_sha256
    )


def _read(storage: Any, manifest: Any, key: str, hit: bool) -> Reference:
    data = storage.read_artifact_file(manifest, STATS_FILE)
    features = np.load(io.BytesIO(storage.read_artifact_file(manifest, FEATURES_FILE)), allow_pickle=False)
    return Reference(
        stats=stats_from_bytes(data),
        features=features,
        key=key,
        cache_key=reference_cache_key(key),
        digest=stats_digest(data),
        attempt=manifest.attempt,
        uri=manifest.uri,
        hit=hit,
    )


def lookup_reference(
    storage: Any, dataset_digest: str, extractor: Any, resolution: int | tuple[int, int]
) -> Reference | None:
    """The cached reference for (dataset, extractor + weights, resolution), or None when not computed yet."""
    from cmflow.cache import lookup

    key = _key_for(dataset_digest, extractor, resolution)
    found = lookup(storage, REFERENCE_KIND, reference_cache_key(key))
    return _read(storage, found.manifest, key, hit=True) if found.hit else None


def _ordered_batches(images: np.ndarray, order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, order.shape[0], batch_size):
        yield images[order[start : start + batch_size]]


def get_reference(
    storage: Any,
    load_images: Callable[[], np.ndarray],
    *,
    dataset_digest: str,
    extractor: Any,
    resolution: int | tuple[int, int],
    batch_size: int = 256,
    max_features: int = REF_MAX_FEATURES,
    on_batch: Callable[[int, int], None] | None = None,
    producer: dict[str, Any] | None = None,
) -> Reference:
    """The reference for (dataset, extractor, resolution): from the store, or computed once and committed.

    Args:
        storage: a :class:`cmflow.storage.Storage`.
        load_images: returns all real images, uint8 (N, C, H, W); only called on a miss.
        dataset_digest: the dataset's content digest (``dataset.json`` ``digest``).
        extractor: a loaded :class:`cmflow.metrics.extractors.FeatureExtractor` (with ``weights_sha256``).
        resolution: the images' resolution (part of the key).
        batch_size: images per extractor call.
        max_features: real feature rows kept in ``features.npy`` (a fixed random subset when N is larger).
        on_batch: ``on_batch(done, total)`` after each batch of a computation (progress).
        producer: provenance recorded in the manifest (run id, stage).
    """
    from cmflow.metrics.extractors import compute_stats

    cached = lookup_reference(storage, dataset_digest, extractor, resolution)
    if cached is not None:
        return cached
    key = _key_for(dataset_digest, extractor, resolution)
    images = load_images()
    total = int(images.shape[0])
    order = np.random.default_rng(_ORDER_SEED).permutation(total)
    done = 0

    def progress(count: int) -> None:
        nonlocal done
        done += count
        if on_batch is not None:
            on_batch(done, total)

    stats = compute_stats(
        extractor,
        _ordered_batches(images, order, batch_size),
        batch_size=batch_size,
        keep_features=int(max_features),
        on_batch=progress,
    )
    mu, sigma = stats.to_moments()
    meta = {
        "reference_key": key,
        "dataset_digest": dataset_digest,
        "extractor": extractor.name,
        "extractor_sha256": extractor.weights_sha256,
        "resolution": list(resolution) if isinstance(resolution, tuple) else int(resolution),
        "num_images": total,
    }
    data = stats_to_bytes(mu, sigma, stats.n, meta)
    with tempfile.TemporaryDirectory(prefix="cmflow-fidref-") as tmp:
        folder = Path(tmp)
        (folder / STATS_FILE).write_bytes(data)
        np.save(folder / FEATURES_FILE, stats.features.astype(np.float32), allow_pickle=False)
        manifest = storage.commit(
            REFERENCE_KIND,
            reference_cache_key(key),
            folder,
            meta={**meta, "stats_digest": stats_digest(data), "features_kept": int(stats.features.shape[0])},
            key_components={"reference_key": key, **meta},
            producer=producer or {},
        )
    return _read(storage, manifest, key, hit=False)
