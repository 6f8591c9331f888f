"""Noise-level grids and training curricula.

Index convention used throughout cmflow (the CM paper's, 0-based): ``karras_sigmas(N)`` is **ascending**,
``sigmas[0] = eps = sigma_min`` ... ``sigmas[N-1] = T = sigma_max``; this is the paper's t_1 ... t_N with
``sigmas[i] = t_{i+1}``. A training pair index ``n`` in {0, ..., N-2} means "student at ``sigmas[n+1]``
(t_{n+1} in the paper, which draws n in {1..N-1}), target at ``sigmas[n]``". The openai code and EDM use the
descending grid ``sigmas.flip(0)`` (index k = N-1-i); samplers in :mod:`cmflow.diffusion.samplers` take
explicit sigma values, so neither convention leaks into them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from cmflow.diffusion.rng import Generator, rand, randint

__all__ = [
    "ct_ema_rate",
    "ct_num_steps",
    "ict_index_probs",
    "ict_num_steps",
    "karras_sigmas",
    "sample_lognormal_indices",
    "sample_uniform_indices",
]


def karras_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The Karras/EDM grid, ascending: t_i = (eps^(1/rho) + (i-1)/(N-1) (T^(1/rho) - eps^(1/rho)))^rho.

    CM Sec. 4 / App. C (EDM Eq. (5) in ascending order), i = 1..N. Returns a (N,) tensor with ``[0] == sigma_min`` and
    ``[-1] == sigma_max`` exactly (the end points are set, not recomputed through the power).
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas.to(dtype=dtype, device=device)


def ct_num_steps(k: int, K: int, s0: int = 2, s1: int = 150) -> int:
    """CT discretisation curriculum N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 (CM App. C).

    ``k`` is the training step, ``K`` the total number of steps. N(0) = s0, N(K) = s1 + 1.
    """
    inner = math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1
    return max(math.ceil(inner), 1) + 1


def ct_ema_rate(
    k: int,
    K: int,
    s0: int = 2,
    mu0: float = 0.95,
    s1: int = 150,
    *,
    convention: Literal["code", "paper"] = "code",
) -> float:
    """CT target-EMA curriculum mu(k) = exp(s0 ln(mu0) / N(k)) (CM App. C).

    Code-vs-paper detail: the released code (``cm/script_util.py`` ``create_ema_and_scales_fn``, JAX
    ``jcm/losses.py``) divides by N(k) - 1, the value before the final "+1" of :func:`ct_num_steps`. So at
    k = 0 it gives mu0^2 (0.9025 for mu0 = 0.95) instead of mu0; late in training the two differ by < 1e-4.
    ``convention="code"`` (default) reproduces the released models, ``"paper"`` the formula as printed.
    """
    n = ct_num_steps(k, K, s0, s1)
    denom = n - 1 if convention == "code" else n
    return math.exp(s0 * math.log(mu0) / denom)


def ict_num_steps(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT exponential curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1.

    iCT (Song & Dhariwal 2023), with K' = floor(K / (log2 floor(s1/s0) + 1)) training steps per stage. With
    s0 = 10, s1 = 1280: 8 stages, N = 11, 21, 41, ..., 1281.
    """
    k_prime = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** (k // max(k_prime, 1)), s1) + 1


def ict_index_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Discretised lognormal over the pairs (sigmas[n], sigmas[n+1]) of an ascending grid (iCT).

    p(n) proportional to erf((ln sigma_{n+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_n - P_mean) /
    (sqrt(2) P_std)). Returns (N-1,) float64 probabilities summing to 1.
    """
    log_s = sigmas.to(torch.float64).log()
    cdf = torch.special.erf((log_s - p_mean) / (math.sqrt(2) * p_std))
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()


def sample_lognormal_indices(
    num: int,
    sigmas: Tensor,
    generator: Generator | None = None,
    p_mean: float = -1.1,
    p_std: float = 2.0,
) -> Tensor:
    """Draw ``num`` pair indices n in {0..N-2} with the iCT discretised lognormal (:func:`ict_index_probs`).

    Inverse-CDF sampling from one uniform per sample, so it works with a ``torch.Generator``, a
    :class:`~cmflow.diffusion.rng.StackedRandomGenerator` (one stream per sample) or ``None`` (global RNG).
    Returns a (num,) int64 tensor on the CPU.
    """
    probs = ict_index_probs(sigmas.cpu(), p_mean, p_std)
    cdf = probs.cumsum(0)
    cdf[-1] = 1.0
    u = rand((num,), generator=generator, dtype=torch.float64, device="cpu")
    idx = torch.searchsorted(cdf, u, right=True)
    return idx.clamp_(max=len(probs) - 1)


def sample_uniform_indices(num: int, num_steps: int, generator: Generator | None = None) -> Tensor:
    """Draw ``num`` pair indices n ~ U{0..N-2} (CM Alg. 2 / 3, paper n ~ U{1..N-1}); (num,) int64, CPU."""
    return randint(0, num_steps - 1, (num,), generator=generator, device="cpu")
