"""Reference statistics <-> .npz bytes, digest and cache key."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from cmflow.metrics.reference import (
    STATS_FORMAT_VERSION,
    reference_key,
    stats_digest,
    stats_from_bytes,
    stats_to_bytes,
)


@pytest.fixture
def moments() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    b = rng.standard_normal((16, 16))
    return rng.standard_normal(16), b @ b.T


def test_round_trip_is_exact(moments: tuple[np.ndarray, np.ndarray]) -> None:
    mu, sigma = moments
    meta = {"dataset_digest": "abc", "extractor": "digits", "resolution": 8}
    ref = stats_from_bytes(stats_to_bytes(mu, sigma, 1797, meta))
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.n == 1797 and isinstance(ref.n, int)
    assert ref.meta == {**meta, "format_version": STATS_FORMAT_VERSION}
    mu2, sigma2, n2, _ = ref  # unpacks like a tuple
    assert n2 == 1797


def test_bytes_are_deterministic(moments: tuple[np.ndarray, np.ndarray]) -> None:
    mu, sigma = moments
    a = stats_to_bytes(mu, sigma, 10, {"b": 1, "a": 2})
    b = stats_to_bytes(mu.copy(), sigma.copy(), 10, {"a": 2, "b": 1})
    assert a == b
    assert stats_digest(a) == stats_digest(b)
    assert re.fullmatch(r"[0-9a-f]{64}", stats_digest(a))
    assert stats_digest(stats_to_bytes(mu, sigma, 11, {"a": 2, "b": 1})) != stats_digest(a)


def test_loads_foreign_npz_with_only_mu_and_sigma(moments: tuple[np.ndarray, np.ndarray]) -> None:
    mu, sigma = moments
    buf = io.BytesIO()
    np.savez(buf, mu=mu.astype(np.float32), sigma=sigma)  # e.g. an EDM / TTUR reference file
    ref = stats_from_bytes(buf.getvalue())
    assert ref.n == -1 and ref.meta == {}
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6)
    assert ref.mu.dtype == np.float64


def test_refuses_pickled_objects_and_wrong_files(moments: tuple[np.ndarray, np.ndarray]) -> None:
    mu, sigma = moments
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=np.array([sigma, "x"], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        stats_from_bytes(buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, features=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        stats_from_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="sigma must be"):
        stats_to_bytes(mu, sigma[:3], 1)


def test_reference_key_is_stable_path_safe_and_sensitive_to_every_input() -> None:
    base = reference_key("d" * 64, "digits", 8)
    assert base == reference_key("d" * 64, "digits", (8, 8))
    assert re.fullmatch(r"fid-ref-digits-8x8-[0-9a-f]{16}", base)
    variants = {
        reference_key("e" * 64, "digits", 8),
        reference_key("d" * 64, "inception-v3", 8),
        reference_key("d" * 64, "digits", 16),
        reference_key("d" * 64, "digits", 8, extractor_digest="f00"),
    }
    assert base not in variants and len(variants) == 4
    assert "/" not in reference_key("d", "weird/name", 32)
