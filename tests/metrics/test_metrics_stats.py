"""FeatureStats, FID (both routes), KID and precision/recall on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmflow.metrics.stats import (
    FeatureStats,
    fid_from_stats,
    fid_from_stats_sqrtm,
    fid_infinity,
    kid,
    precision_recall,
)


def random_spd(d: int, rng: np.random.Generator, n: int | None = None, jitter: float = 0.1) -> np.ndarray:
    """A random symmetric positive-definite matrix (Wishart-like, plus a ridge)."""
    b = rng.standard_normal((d, n or d))
    return b @ b.T / b.shape[1] + jitter * np.eye(d)


# -- FID -----------------------------------------------------------------------------------------------------


def test_fid_of_identical_stats_is_zero() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_spd(64, rng)
    assert abs(fid_from_stats(mu, sigma, mu, sigma)) <= 1e-6
    assert abs(fid_from_stats_sqrtm(mu, sigma, mu, sigma)) <= 1e-6


def test_fid_of_identical_rank_deficient_stats_is_near_zero() -> None:
    # 40 samples in 64 dims: covariance of rank 39. The eigen route needs no regularisation; the error comes
    # from sqrt of eigenvalues that are zero up to rounding (~sqrt(eps * |sigma|) each).
    rng = np.random.default_rng(1)
    stats = FeatureStats()
    stats.update(rng.standard_normal((40, 64)))
    mu, sigma = stats.to_moments()
    assert np.linalg.matrix_rank(sigma) == 39
    assert abs(fid_from_stats(mu, sigma, mu, sigma)) <= 1e-5


def test_fid_matches_closed_form_for_diagonal_gaussians() -> None:
    rng = np.random.default_rng(2)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert fid_from_stats_sqrtm(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-8)


def test_fid_matches_closed_form_for_scaled_full_covariance() -> None:
    # sigma2 = c^2 sigma1 => Tr((sigma1 sigma2)^1/2) = c Tr(sigma1) => FID = |dmu|^2 + (1 - c)^2 Tr(sigma1)
    rng = np.random.default_rng(3)
    d, c = 48, 1.7
    sigma1 = random_spd(d, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(sigma1)
    assert fid_from_stats(mu1, sigma1, mu2, c**2 * sigma1) == pytest.approx(expected, rel=1e-9)


def test_fid_accepts_torch_tensors_and_checks_shapes() -> None:
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(8), random_spd(8, rng)
    ref = fid_from_stats(mu, sigma, np.zeros(8), np.eye(8))
    got = fid_from_stats(torch.from_numpy(mu).float(), torch.from_numpy(sigma), torch.zeros(8), torch.eye(8))
    assert got == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        fid_from_stats(mu, sigma, np.zeros(7), np.eye(7))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_stats(mu, sigma * np.nan, mu, sigma)


def test_eigen_route_agrees_with_scipy_sqrtm_at_2048_dims() -> None:
    # One pair only: scipy's sqrtm takes ~9 s at 2048 dims on 2 cores, the eigen route ~1 s.
    rng = np.random.default_rng(5)
    d = 2048
    mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    sigma1, sigma2 = random_spd(d, rng), random_spd(d, rng, jitter=0.05)
    fid_eig = fid_from_stats(mu1, sigma1, mu2, sigma2)
    fid_sqrtm = fid_from_stats_sqrtm(mu1, sigma1, mu2, sigma2)
    assert fid_eig > 1.0
    assert abs(fid_eig - fid_sqrtm) / abs(fid_sqrtm) <= 1e-6


# -- FeatureStats --------------------------------------------------------------------------------------------


def test_fid_infinity_removes_the_finite_sample_bias() -> None:
    # Gaussian features with known moments: the closed-form FID is the truth. Over 40 draws of 2 000 rows the
    # plug-in FID sits a clear k / N above it (many standard errors), the extrapolated FID_inf does not.
    rng = np.random.default_rng(0)
    d = 16
    mu_ref, sigma_ref = np.zeros(d), random_spd(d, rng)
    mu_gen, sigma_gen = np.full(d, 0.05), 1.3 * sigma_ref
    truth = fid_from_stats(mu_gen, sigma_gen, mu_ref, sigma_ref)
    plug, extrapolated, slopes = [], [], []
    for _ in range(40):
        x = rng.multivariate_normal(mu_gen, sigma_gen, size=2000)
        plug.append(fid_from_stats(x.mean(axis=0), np.cov(x, rowvar=False), mu_ref, sigma_ref))
        fid_inf, slope = fid_infinity(x, mu_ref, sigma_ref)
        extrapolated.append(fid_inf)
        slopes.append(slope)
    bias = np.mean(plug) - truth
    stderr = np.std(plug) / np.sqrt(len(plug))
    assert bias > 4 * stderr
    assert abs(np.mean(extrapolated) - truth) < 0.3 * bias
    assert np.mean(slopes) / 2000 == pytest.approx(bias, rel=0.5)  # the fitted k / N is the bias itself


def test_fid_infinity_needs_three_sizes_and_2d_features() -> None:
    rng = np.random.default_rng(1)
    mu, sigma = np.zeros(8), np.eye(8)
    assert fid_infinity(rng.standard_normal((63, 8)), mu, sigma) is None  # 63, 31, 15: 15 < 2 d
    assert fid_infinity(rng.standard_normal((64, 8)), mu, sigma) is not None  # 64, 32, 16
    with pytest.raises(ValueError, match="shape"):
        fid_infinity(rng.standard_normal(64), mu, sigma)


def test_streaming_stats_equal_numpy_on_the_whole_array() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1000, 16)) @ rng.standard_normal((16, 16)) + 3.0
    stats = FeatureStats(keep_features=False)
    for chunk in np.array_split(x, [1, 7, 300, 301, 999]):  # uneven, including a 1-row chunk
        stats.update(chunk)
    assert stats.n == 1000
    np.testing.assert_allclose(stats.mean(), x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    mu, sigma = stats.to_moments()
    assert mu.dtype == np.float64 and sigma.dtype == np.float64


def test_streaming_stats_are_accurate_for_features_with_a_large_mean() -> None:
    # A large common offset breaks the naive sum(x x^T) - n mu mu^T formula; the shifted sums do not.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2000, 8)) + 1e6
    stats = FeatureStats()
    for chunk in np.array_split(x, 10):
        stats.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(stats.cov(), np.cov(x - 1e6, rowvar=False), rtol=1e-6, atol=1e-6)


def test_merge_equals_one_accumulator() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((500, 12)) * 2 + 5
    a, b, whole = FeatureStats(keep_features=True), FeatureStats(), FeatureStats()
    a.update(x[:123])
    b.update(x[123:] + 0.0)
    whole.update(x)
    merged = a.merge(b)
    assert merged.n == 500
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-12)
    np.testing.assert_allclose(merged.cov(), whole.cov(), rtol=1e-10, atol=1e-12)
    assert a.merge(FeatureStats()).n == 123 and FeatureStats().merge(b).n == 377
    np.testing.assert_array_equal(merged.features, x[:123].astype(np.float32))  # b kept none


def test_keep_features_limits() -> None:
    x = np.arange(40, dtype=np.float64).reshape(10, 4)
    none, some, every = FeatureStats(), FeatureStats(keep_features=7), FeatureStats(keep_features=True)
    for s in (none, some, every):
        s.update(x[:5])
        s.update(x[5:])
    assert none.features.shape == (0, 4)
    np.testing.assert_array_equal(some.features, x[:7].astype(np.float32))
    np.testing.assert_array_equal(every.features, x.astype(np.float32))


def test_feature_stats_rejects_bad_input() -> None:
    s = FeatureStats(num_features=4)
    with pytest.raises(ValueError, match="4 features"):
        s.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        s.update(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((2, 4), np.nan))
    s.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        s.cov()


# -- KID -----------------------------------------------------------------------------------------------------


def test_kid_matches_direct_unbiased_mmd_when_the_subset_is_everything() -> None:
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((30, 5)), rng.standard_normal((30, 5)) + 0.3
    kernel = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
    m = 30
    direct = (
        (kernel(x, x).sum() - np.trace(kernel(x, x))) / (m * (m - 1))
        + (kernel(y, y).sum() - np.trace(kernel(y, y))) / (m * (m - 1))
        - 2 * kernel(x, y).mean()
    )
    mean, std = kid(x, y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(direct, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)  # every "subset" is a permutation of all rows


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two() -> None:
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((1500, 32)), rng.standard_normal((1500, 32))
    c = rng.standard_normal((1500, 32)) * 1.3 + 0.2
    same_mean, same_std = kid(a, b, num_subsets=30, subset_size=500)
    diff_mean, diff_std = kid(a, c, num_subsets=30, subset_size=500)
    assert abs(same_mean) < 3 * same_std
    assert diff_mean > 10 * diff_std > 0
    assert diff_mean > 20 * abs(same_mean)


# -- precision / recall --------------------------------------------------------------------------------------


def test_precision_recall_same_distribution_is_near_one() -> None:
    rng = np.random.default_rng(11)
    real, fake = rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4))
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9 and recall > 0.9


def test_precision_recall_disjoint_is_zero() -> None:
    rng = np.random.default_rng(12)
    real, fake = rng.standard_normal((500, 4)), rng.standard_normal((500, 4)) + 20.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_detects_mode_dropping() -> None:
    # real: two well-separated modes; fake: only one of them -> high precision, recall about one half
    rng = np.random.default_rng(13)
    centres = np.where(rng.random(2000) < 0.5, -10.0, 10.0)[:, None]
    real = rng.standard_normal((2000, 3)) + centres
    fake = rng.standard_normal((1000, 3)) + 10.0
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert 0.35 < recall < 0.6


def test_precision_recall_does_not_depend_on_batch_size() -> None:
    rng = np.random.default_rng(14)
    real, fake = rng.standard_normal((300, 8)), rng.standard_normal((250, 8)) * 1.2
    assert precision_recall(real, fake, batch_size=7) == precision_recall(real, fake, batch_size=4096)
