"""Karras grid, CT / iCT curricula and lognormal index sampling (reference Sec. 2.1, 4.2, 4.3)."""

import math

import pytest
import scipy.special
import torch

from cmflow.diffusion import (
    StackedRandomGenerator,
    ct_ema_rate,
    ct_num_steps,
    ict_index_probs,
    ict_num_steps,
    karras_sigmas,
    sample_lognormal_indices,
    sample_uniform_indices,
)

# Reference doc Sec. 2.1, N = 18, printed in descending order.
KARRAS_18 = [80, 57.586, 40.786, 28.375, 19.353, 12.910, 8.401, 5.315, 3.257, 1.923, 1.088, 0.585,
             0.296, 0.140, 0.060, 0.023, 0.0075, 0.002]  # fmt: skip


def test_karras_endpoints_and_order():
    for n in (2, 18, 40, 1281):
        s = karras_sigmas(n)
        assert s.dtype == torch.float64 and s.shape == (n,)
        assert float(s[0]) == 0.002 and float(s[-1]) == 80.0
        assert bool((s[1:] > s[:-1]).all())
    with pytest.raises(ValueError):
        karras_sigmas(1)


def test_karras_18_values():
    s = karras_sigmas(18).flip(0).tolist()
    for got, want in zip(s, KARRAS_18, strict=True):
        assert got == pytest.approx(want, abs=6e-4)


def test_karras_40_midpoints():
    s = karras_sigmas(40).flip(0)
    assert float(s[22]) == pytest.approx(1.382, abs=6e-4)  # CD ImageNet-64 2-step midpoint
    assert float(s[17]) == pytest.approx(4.366, abs=6e-4)
    assert float(karras_sigmas(201).flip(0)[106]) == pytest.approx(1.913, abs=6e-4)


def test_karras_formula():
    n, rho = 11, 7.0
    s = karras_sigmas(n, 0.01, 10.0, rho)
    i = torch.arange(n, dtype=torch.float64)
    want = (0.01 ** (1 / rho) + i / (n - 1) * (10.0 ** (1 / rho) - 0.01 ** (1 / rho))) ** rho
    torch.testing.assert_close(s, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "k, n, mu_code, mu_paper",  # CIFAR-10: s0=2, s1=150, mu0=0.9, K=800k (reference Sec. 4.2)
    [(0, 2, 0.81, 0.9), (100_000, 54, 0.99603, 0.99611), (400_000, 107, 0.99801, 0.99803),
     (800_000, 151, 0.99860, 0.99861)],
)  # fmt: skip
def test_ct_curriculum_cifar10(k, n, mu_code, mu_paper):
    K = 800_000
    assert ct_num_steps(k, K, s0=2, s1=150) == n
    assert ct_ema_rate(k, K, s0=2, mu0=0.9, s1=150) == pytest.approx(mu_code, abs=1e-5)
    assert ct_ema_rate(k, K, s0=2, mu0=0.9, s1=150, convention="paper") == pytest.approx(mu_paper, abs=1e-5)


def test_ct_curriculum_imagenet64():
    K = 800_000
    assert ct_num_steps(0, K, 2, 200) == 2
    assert ct_ema_rate(0, K, 2, 0.95, 200) == pytest.approx(0.95**2)  # code: mu0^2 at k = 0
    assert ct_num_steps(400_000, K, 2, 200) == 143
    assert ct_ema_rate(400_000, K, 2, 0.95, 200) == pytest.approx(0.99928, abs=1e-5)
    assert ct_num_steps(K, K, 2, 200) == 201
    assert ct_ema_rate(K, K, 2, 0.95, 200) == pytest.approx(0.99949, abs=1e-5)
    ns = [ct_num_steps(k, K, 2, 200) for k in range(0, K + 1, 10_000)]
    assert ns == sorted(ns)


def test_ict_curriculum():
    K = 400_000  # K' = 50k, 8 stages
    ns = [ict_num_steps(k, K) for k in range(0, K, 50_000)]
    assert ns == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_num_steps(49_999, K) == 11 and ict_num_steps(50_000, K) == 21
    assert ict_num_steps(K, K) == 1281


def test_ict_index_probs_against_scipy():
    sigmas = karras_sigmas(41)
    p = ict_index_probs(sigmas)
    assert p.shape == (40,) and float(p.sum()) == pytest.approx(1.0, abs=1e-12) and bool((p > 0).all())
    log_s = sigmas.log().numpy()
    cdf = scipy.special.erf((log_s + 1.1) / (math.sqrt(2) * 2.0))
    want = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    torch.testing.assert_close(p, torch.from_numpy(want), rtol=1e-10, atol=0)
    mode = int(p.argmax())  # the densest pair brackets the lognormal median exp(P_mean) ~ 0.33 (in log-width)
    assert 0.05 < float(sigmas[mode]) < 2.0


def test_lognormal_index_sampling_matches_probs():
    sigmas = karras_sigmas(21)
    p = ict_index_probs(sigmas)
    n = 40_000
    idx = sample_lognormal_indices(n, sigmas, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and int(idx.min()) >= 0 and int(idx.max()) <= 19
    freq = torch.bincount(idx, minlength=20).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() < 5 * se + 1e-4).all())


def test_index_sampling_is_per_sample_with_stacked_generator():
    sigmas = karras_sigmas(41)
    a = sample_lognormal_indices(8, sigmas, StackedRandomGenerator("cpu", range(8)))
    b = torch.cat([sample_lognormal_indices(4, sigmas, StackedRandomGenerator("cpu", r))
                   for r in (range(4), range(4, 8))])  # fmt: skip
    assert torch.equal(a, b)
    u = sample_uniform_indices(1000, 18, torch.Generator().manual_seed(0))
    assert int(u.min()) == 0 and int(u.max()) == 16  # pair indices n in {0..N-2}
