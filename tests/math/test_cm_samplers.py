"""Solvers and samplers against closed forms for Gaussian data, NFE counts, per-sample seeds."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cmflow.diffusion import (
    StackedRandomGenerator,
    cm_sample,
    cm_sigmas_from_indices,
    edm_sampler,
    euler_step,
    heun_step,
    ternary_search_midpoint,
)
from cmflow.models import CMPrecond, EDMPrecond, make_unet

S = 0.5  # data std: x0 ~ N(0, S^2 I)
EPS, T = 0.002, 80.0


def gaussian_denoiser(x, sigma, class_labels=None):
    """Ideal denoiser for N(0, S^2 I) data: E[x0 | x] = x S^2 / (S^2 + sigma^2)."""
    return x * S**2 / (S**2 + sigma**2)


def ode_solution(x0, sigma0, sigma):
    """PF-ODE solution for Gaussian data: x(sigma) = x(sigma0) sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma0^2)."""
    return x0 * math.sqrt(S**2 + sigma**2) / math.sqrt(S**2 + sigma0**2)


class Counting(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _random_tiny(seed=0):
    torch.manual_seed(seed)
    net = make_unet("tiny", 8, 1, attn_resolutions=(8,))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


# ---------------------------------------------------------------- solvers


def test_heun_and_euler_exact_for_zero_data():
    # D = 0 (data concentrated at 0): dx/dsigma = x / sigma, x(sigma') = x sigma' / sigma; both are exact.
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    zero = lambda x, sigma, class_labels=None: torch.zeros_like(x)  # noqa: E731
    for step in (euler_step, heun_step):
        torch.testing.assert_close(step(zero, x, 10.0, 0.3), x * 0.03, rtol=1e-12, atol=0)


def test_heun_per_sample_levels():
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([80.0, 1.0, 0.01], dtype=torch.float64)
    t_next = t / 2
    out = heun_step(gaussian_denoiser, x, t, t_next)
    for i in range(3):
        torch.testing.assert_close(
            out[i : i + 1], heun_step(gaussian_denoiser, x[i : i + 1], t[i], t_next[i])
        )
    with pytest.raises(ValueError):
        heun_step(gaussian_denoiser, x, 1.0, 0.0)


def test_heun_local_error_is_third_order():
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    errs, hs = [], [0.2, 0.1, 0.05, 0.025]
    for h in hs:
        got = heun_step(gaussian_denoiser, x, 1.0, 1.0 - h)
        errs.append(abs(float(got) - ode_solution(1.0, 1.0, 1.0 - h)))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert 2.8 < slope < 3.2


def test_euler_with_clean_sample_is_ct_target():
    # CT replaces D(x_t, t) by the clean sample: the Euler step lands on x0 + t' z with the same z.
    x0, z = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    out = euler_step(lambda x, sigma, class_labels=None: x0, x0 + 5.0 * z, 5.0, 0.7)
    torch.testing.assert_close(out, x0 + 0.7 * z, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- EDM sampler


def test_edm_sampler_matches_closed_form_with_second_order_convergence():
    z = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_eps = ode_solution(z * T, T, EPS)
    final_euler = S**2 / (S**2 + EPS**2)  # last step eps -> 0 is Euler: x(0) = D(x(eps), eps)
    steps, errs = [16, 32, 64, 128, 256], []
    for n in steps:
        out = edm_sampler(gaussian_denoiser, z, num_steps=n)
        errs.append(float((out / final_euler - x_eps).abs().max() / x_eps.abs().max()))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    print(f"Heun order {slope:.3f}, rel. errors {errs}")
    assert 1.8 < slope < 2.3, (slope, errs)
    assert errs[-1] < 3e-4
    # and against the exact x(0) = x(T) S / sqrt(S^2 + T^2) (Euler last step adds an O(eps^2/S^2) bias)
    out = edm_sampler(gaussian_denoiser, z, num_steps=256)
    torch.testing.assert_close(out, ode_solution(z * T, T, 0.0), rtol=3e-4, atol=1e-6)


def test_edm_sampler_dtype_and_nfe():
    count = Counting(gaussian_denoiser)
    z = torch.randn(2, 1, 2, 2)
    out = edm_sampler(count, z, num_steps=18)
    assert count.calls == 35 and out.dtype == torch.float32
    for n in (2, 5, 40):
        count.calls = 0
        edm_sampler(count, z, num_steps=n)
        assert count.calls == 2 * n - 1


# ---------------------------------------------------------------- CM sampling


def test_cm_sample_nfe_and_one_step():
    f = CMPrecond(_random_tiny())
    count = Counting(f)
    z = torch.randn(3, 1, 8, 8)
    one = cm_sample(count, z, [80.0])
    assert count.calls == 1
    torch.testing.assert_close(one, f(80.0 * z, 80.0).clamp(-1, 1), rtol=0, atol=0)
    for k, sig in ((2, [80.0, 0.821]), (3, [80.0, 1.5, 0.2]), (5, [80.0, 10.0, 1.0, 0.1, 0.01])):
        count.calls = 0
        out = cm_sample(count, z, sig, generator=torch.Generator().manual_seed(0))
        assert count.calls == k and out.abs().max() <= 1.0
    with pytest.raises(ValueError):
        cm_sample(f, z, [1.0, 80.0])


def test_cm_sample_noise_std_is_sqrt_tau2_minus_eps2():
    inputs = []

    def zero_model(x, sigma, class_labels=None):
        inputs.append((x.clone(), sigma))
        return torch.zeros_like(x)

    z = torch.randn(2, 1, 4, 4)
    cm_sample(zero_model, z, [80.0, 0.5], generator=torch.Generator().manual_seed(7))
    z2 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(inputs[0][0], 80.0 * z)
    torch.testing.assert_close(inputs[1][0], math.sqrt(0.5**2 - EPS**2) * z2)
    assert inputs[1][1] == 0.5


def test_per_sample_seeds_independent_of_batch_split():
    net = _random_tiny()
    edm, cm = EDMPrecond(net), CMPrecond(net)

    def run(seeds):
        gen = StackedRandomGenerator("cpu", seeds)
        z = gen.randn([len(seeds), 1, 8, 8])
        return edm_sampler(edm, z, num_steps=5), cm_sample(cm, z, [80.0, 0.8, 0.1], generator=gen)

    a8, b8 = run(range(8))
    halves = [run(range(0, 4)), run(range(4, 8))]
    assert torch.equal(a8, torch.cat([h[0] for h in halves]))
    assert torch.equal(b8, torch.cat([h[1] for h in halves]))
    assert not torch.equal(a8[0], a8[1])


def test_sigmas_from_indices():
    sig = cm_sigmas_from_indices((0, 22, 39), 40)
    assert len(sig) == 2 and sig[0] == 80.0 and sig[1] == pytest.approx(1.382, abs=6e-4)
    assert cm_sigmas_from_indices((0, 106, 200), 201)[1] == pytest.approx(1.913, abs=6e-4)
    assert cm_sigmas_from_indices((0,), 18) == [80.0]
    with pytest.raises(ValueError):
        cm_sigmas_from_indices((0, 40), 40)


def test_ternary_search_finds_log_space_minimum():
    calls = []

    def score(sigma):
        calls.append(sigma)
        return (math.log(sigma) - math.log(1.5)) ** 2

    best, val = ternary_search_midpoint(score, num_iters=20)
    assert len(calls) == 40
    assert best == pytest.approx(1.5, rel=1e-3) and val < 1e-6
    assert all(0.002 <= c <= 80.0 for c in calls)
