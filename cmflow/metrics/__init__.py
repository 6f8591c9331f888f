"""FID and friends for cmflow: float64 feature statistics, FID / KID / precision-recall, feature extractors.

- :mod:`cmflow.metrics.stats`: ``FeatureStats``, ``fid_from_stats`` (+ the ``_sqrtm`` cross-check), ``kid``,
  ``precision_recall`` (numpy/scipy only).
- :mod:`cmflow.metrics.extractors`: the ``FeatureExtractor`` interface, ``EXTRACTORS``, ``load_extractor``,
  ``compute_stats`` (torch).
- :mod:`cmflow.metrics.inception`: the TF-2015-12-05-compatible Inception-v3 (pool3, legacy-TF resize).
- :mod:`cmflow.metrics.digits_net`: the small digits network whose weights ship in ``weights/``.
- :mod:`cmflow.metrics.reference`: reference statistics <-> .npz bytes, their cache key.

The torch-based names are imported on first access, so ``import cmflow.metrics`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from cmflow.metrics.reference import (
    ReferenceStats,
    reference_key,
    stats_digest,
    stats_from_bytes,
    stats_to_bytes,
)
from cmflow.metrics.stats import FeatureStats, fid_from_stats, fid_from_stats_sqrtm, kid, precision_recall

_LAZY = {
    "EXTRACTORS": "cmflow.metrics.extractors",
    "FeatureExtractor": "cmflow.metrics.extractors",
    "compute_stats": "cmflow.metrics.extractors",
    "load_extractor": "cmflow.metrics.extractors",
}

__all__ = [
    "FeatureStats",
    "ReferenceStats",
    "fid_from_stats",
    "fid_from_stats_sqrtm",
    "kid",
    "precision_recall",
    "reference_key",
    "stats_digest",
    "stats_from_bytes",
    "stats_to_bytes",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
