"""Reference statistics as bytes: (mu, sigma, n, meta) <-> .npz, and their cache key.

Pure helpers; the storage layer decides where the bytes live. The .npz holds ``mu`` (D,) and ``sigma`` (D, D)
as float64 (the key names of TTUR / EDM / OpenAI reference files, so theirs load too), ``n`` (int64) and
``meta`` (a JSON string). The bytes are deterministic: the same statistics and meta always serialise to the
same bytes (fixed zip timestamps, sorted JSON keys), so :func:`stats_digest` of them is stable.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "STATS_FORMAT_VERSION",
    "ReferenceStats",
    "reference_key",
    "stats_digest",
    "stats_from_bytes",
    "stats_to_bytes",
]

STATS_FORMAT_VERSION = 1
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class ReferenceStats(NamedTuple):
    """Moments of a feature distribution. ``n`` is -1 when the file did not record it."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict[str, Any]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array, order="C"), allow_pickle=False)
    return buf.getvalue()


def stats_to_bytes(mu: Any, sigma: Any, n: int, meta: dict[str, Any] | None = None) -> bytes:
    """Serialise reference statistics to deterministic .npz bytes.

    Args:
        mu: mean feature vector (D,).
        sigma: covariance (D, D).
        n: number of images the statistics were computed from.
        meta: JSON-serialisable provenance (dataset digest, extractor name and weights sha256, resolution...).
    """
    mu = np.asarray(mu, dtype=np.float64).ravel()
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma must be ({mu.shape[0]}, {mu.shape[0]}), got {sigma.shape}")
    meta_json = json.dumps({"format_version": STATS_FORMAT_VERSION, **(meta or {})}, sort_keys=True)
    arrays = {
        "mu": mu,
        "sigma": sigma,
        "n": np.asarray(int(n), dtype=np.int64),
        "meta": np.asarray(meta_json),  # unicode scalar, loads without pickle
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_bytes(array))
    return buf.getvalue()


def stats_from_bytes(data: bytes) -> ReferenceStats:
    """Load statistics written by :func:`stats_to_bytes` (or any .npz with ``mu`` and ``sigma``).

    Never unpickles (``allow_pickle=False``).
    """
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if "mu" not in npz.files or "sigma" not in npz.files:
            raise ValueError(
                f"not a reference-statistics .npz: keys {sorted(npz.files)}, need 'mu' and 'sigma'"
            )
        mu = np.asarray(npz["mu"], dtype=np.float64)
        sigma = np.asarray(npz["sigma"], dtype=np.float64)
        n = int(npz["n"]) if "n" in npz.files else -1
        meta = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
    return ReferenceStats(mu=mu, sigma=sigma, n=n, meta=meta)


def stats_digest(data: bytes) -> str:
    """sha256 hex digest of serialised statistics (stable, since :func:`stats_to_bytes` is deterministic)."""
    return hashlib.sha256(data).hexdigest()


def reference_key(
    dataset_digest: str,
    extractor_name: str,
    resolution: int | tuple[int, int],
    extractor_digest: str | None = None,
    num_images: int | None = None,
) -> str:
    """Cache key of the reference statistics for (dataset, extractor, resolution).

    Returns a readable, path-safe string ``fid-ref-<extractor>-<res>-<hash16>``. The hash covers all the
    inputs and :data:`STATS_FORMAT_VERSION`. Pass ``extractor_digest`` (the sha256 of the extractor's
    weights) so that retrained or different weights never reuse stale statistics, and ``num_images`` when
    the statistics cover only the dataset's first ``num_images`` rows.
    """
    res = (resolution, resolution) if isinstance(resolution, int) else tuple(int(r) for r in resolution)
    fields: dict[str, Any] = {
        "dataset": dataset_digest,
        "extractor": extractor_name,
        "extractor_digest": extractor_digest,
        "resolution": list(res),
        "format_version": STATS_FORMAT_VERSION,
    }
    if num_images is not None:
        fields["num_images"] = int(num_images)
    payload = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in extractor_name)
    return f"fid-ref-{safe_name}-{res[0]}x{res[1]}-{digest}"
