"""Reference statistics of a dataset, computed once and cached as a write-once artifact in the store.

The artifact (kind ``fid_reference``) lives at ``artifacts/fid_reference/<k[:2]>/<k>/`` where ``k`` is the
sha256 hex of :func:`cmflow.metrics.reference.reference_key` for (dataset digest, extractor name, image
resolution, extractor weights sha256): any evaluate stage, pipeline or run that needs the same reference
finds it there, and retrained or different extractor weights never reuse stale statistics. Files::

    stats.npz       mu (D,), sigma (D, D) float64, n, meta   (cmflow.metrics.reference.stats_to_bytes)
    features.npy    float32 (K, D): features of K real images (all of them, or a fixed random subset of
                    REF_MAX_FEATURES), for KID and precision/recall

The evaluate stage computes the statistics in parallel tasks over slices of the dataset and merges them; the
kept rows are a fixed pseudo-random subset of row indices (numpy ``default_rng(0)``, :func:`kept_rows`), an
unbiased subset even when the dataset is sorted by class. A concurrent second writer adopts the first one's
commit (:meth:`cmflow.storage.Storage.commit`).
"""

from __future__ import annotations

import hashlib
import io
import tempfile
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
    "commit_reference",
    "kept_rows",
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


def _key_for(
    dataset_digest: str, extractor: Any, resolution: int | tuple[int, int], num_images: int | None = None
) -> str:
    return reference_key(
        dataset_digest,
        extractor.name,
        resolution,
        extractor_digest=extractor.weights_sha256,
        num_images=num_images,
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
    storage: Any,
    dataset_digest: str,
    extractor: Any,
    resolution: int | tuple[int, int],
    num_images: int | None = None,
) -> Reference | None:
    """The cached reference for (dataset, extractor + weights, resolution), or None when not computed yet."""
    from cmflow.cache import lookup

    key = _key_for(dataset_digest, extractor, resolution, num_images)
    found = lookup(storage, REFERENCE_KIND, reference_cache_key(key))
    return _read(storage, found.manifest, key, hit=True) if found.hit else None


def kept_rows(num_images: int, max_features: int = REF_MAX_FEATURES) -> np.ndarray:
    """The rows whose features the reference keeps: all of them, or a fixed random subset (sorted)."""
    if num_images <= max_features:
        return np.arange(num_images, dtype=np.int64)
    rows = np.random.default_rng(_ORDER_SEED).choice(num_images, max_features, replace=False)
    return np.sort(rows).astype(np.int64)


def commit_reference(
    storage: Any,
    stats: Any,
    features: np.ndarray,
    *,
    dataset_digest: str,
    extractor: Any,
    resolution: int | tuple[int, int],
    num_images: int | None = None,
    producer: dict[str, Any] | None = None,
) -> Reference:
    """Commit computed reference statistics (a ``FeatureStats`` of the real images and the kept feature rows)
    as the write-once ``fid_reference`` artifact (a racing writer adopts the first commit) and read it back."""
    key = _key_for(dataset_digest, extractor, resolution, num_images)
    mu, sigma = stats.to_moments()
    meta = {
        "reference_key": key,
        "dataset_digest": dataset_digest,
        "extractor": extractor.name,
        "extractor_sha256": extractor.weights_sha256,
        "resolution": list(resolution) if isinstance(resolution, tuple) else int(resolution),
        "num_images": int(stats.n),
    }
    data = stats_to_bytes(mu, sigma, stats.n, meta)
    with tempfile.TemporaryDirectory(prefix="cmflow-fidref-") as tmp:
        folder = Path(tmp)
        (folder / STATS_FILE).write_bytes(data)
        np.save(folder / FEATURES_FILE, features.astype(np.float32), allow_pickle=False)
        manifest = storage.commit(
            REFERENCE_KIND,
            reference_cache_key(key),
            folder,
            meta={**meta, "stats_digest": stats_digest(data), "features_kept": int(features.shape[0])},
            key_components={"reference_key": key, **meta},
            producer=producer or {},
        )
    return _read(storage, manifest, key, hit=False)
