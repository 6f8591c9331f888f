"""Samplers: the EDM Heun teacher sampler and consistency-model sampling (CM Algorithm 1).

All are pure functions of a network, latents z ~ N(0, I) and an optional generator; the noise scale
(sigma_max) is applied inside. For per-sample reproducibility draw ``latents`` from a
:class:`~cmflow.diffusion.rng.StackedRandomGenerator` and pass the same generator to :func:`cm_sample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cmflow.diffusion.noise_levels import karras_sigmas
from cmflow.diffusion.rng import Generator, randn_like
from cmflow.diffusion.solvers import Denoiser

__all__ = ["cm_sample", "cm_sigmas_from_indices", "edm_sampler", "ternary_search_midpoint"]


@torch.no_grad()
def edm_sampler(
    denoiser: Denoiser,
    latents: Tensor,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    class_labels: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Deterministic EDM sampler (EDM Alg. 1, i.e. Alg. 2 with S_churn = 0): Heun steps on the Karras grid.

    The grid is t_0 = sigma_max > ... > t_{N-1} = sigma_min, t_N = 0; x_0 = sigma_max z; every step is Euler
    plus the 2nd-order correction except the last one (to sigma = 0), which is Euler only, so
    NFE = 2 num_steps - 1 (35 for the CIFAR-10 setting N = 18). Integrates in ``dtype`` (float64 as in EDM)
    and returns the un-clamped result in ``latents.dtype``.
    """
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=latents.device).flip(0)
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0
    x = latents.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        d = (x - denoiser(x, t_cur, class_labels=class_labels).to(dtype)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if i < num_steps - 1:  # 2nd-order correction (EDM Alg. 1)
            d_next = (x_next - denoiser(x_next, t_next, class_labels=class_labels).to(dtype)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x.to(latents.dtype)


@torch.no_grad()
def cm_sample(
    model: Callable[..., Tensor],
    latents: Tensor,
    sigmas: Sequence[float],
    *,
    generator: Generator | None = None,
    sigma_min: float = 0.002,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Multistep consistency sampling (CM Algorithm 1); ``len(sigmas)`` network evaluations.

    ``sigmas`` = (tau_0 = T, tau_1, ..., tau_{K-1}), strictly decreasing, each in [sigma_min, T]. Then
    x <- f(tau_0 z, tau_0); for each next tau: x <- f(x + sqrt(tau^2 - eps^2) z', tau), with a fresh
    z' ~ N(0, I) from ``generator`` (global RNG if ``None``). Every f output is clamped to [-1, 1] (openai
    ``karras_sample(clip_denoised=True)``). One-step sampling: ``sigmas=[80.0]``; the 2-step CIFAR-10
    iCT/ECT setting: ``[80.0, 0.821]``.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas:
        raise ValueError("sigmas must contain at least one noise level")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)) or sigmas[-1] < sigma_min:
        raise ValueError(f"sigmas must be strictly decreasing and >= sigma_min, got {sigmas}")
    x = model(latents * sigmas[0], sigmas[0], class_labels=class_labels).clamp(-1, 1)
    for sigma in sigmas[1:]:
        z = randn_like(x, generator)
        x = x + math.sqrt(sigma**2 - sigma_min**2) * z
        x = model(x, sigma, class_labels=class_labels).clamp(-1, 1)
    return x


def cm_sigmas_from_indices(
    indices: Sequence[int],
    num_scales: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> list[float]:
    """Sigma values for openai-style ``ts`` indices into the **descending** ``num_scales``-point Karras grid.

    Index 0 is sigma_max and index ``num_scales - 1`` is sigma_min (reference Sec. 5.1). A trailing
    ``num_scales - 1`` is dropped: in the openai sampler it only adds noise of std sqrt(eps^2 - eps^2) = 0,
    and f(x, eps) = x, so ``(0, 22, 39)`` on 40 scales gives ``[80.0, 1.382...]`` (2 NFE, CD ImageNet-64).
    """
    grid = karras_sigmas(num_scales, sigma_min, sigma_max, rho).flip(0)
    idx = [int(i) for i in indices]
    if any(i < 0 or i >= num_scales for i in idx):
        raise ValueError(f"indices must lie in [0, {num_scales}), got {idx}")
    if len(idx) > 1 and idx[-1] == num_scales - 1:
        idx = idx[:-1]
    return [float(grid[i]) for i in idx]


def ternary_search_midpoint(
    score_fn: Callable[[float], float],
    lo: float = 0.002,
    hi: float = 80.0,
    num_iters: int = 12,
) -> tuple[float, float]:
    """Ternary search for the 2-step midpoint tau_1 minimising ``score_fn`` (e.g. FID of [T, tau_1] samples).

    The search runs over u = ln(sigma) in [ln lo, ln hi]: the Karras grid and the published midpoints (0.821,
    1.382, 1.526) are spread geometrically, and FID varies on that scale, so the unimodality that ternary
    search needs is more plausible in log space. Each iteration scores two interior points and keeps the 2/3
    of the interval on the better side (CM ``scripts/ternary_search.py`` does this on grid indices); the
    interval shrinks by (2/3)^num_iters and 2 num_iters scores are computed. Lower is better. Returns the best
    (sigma, score) seen over all evaluations.
    """
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got {lo}, {hi}")
    a, b = math.log(lo), math.log(hi)
    best = (math.nan, math.inf)
    for _ in range(num_iters):
        m1, m2 = a + (b - a) / 3, b - (b - a) / 3
        s1, s2 = float(score_fn(math.exp(m1))), float(score_fn(math.exp(m2)))
        for m, s in ((m1, s1), (m2, s2)):
            if s < best[1]:
                best = (math.exp(m), s)
        if s1 <= s2:
            b = m2
        else:
            a = m1
    return best
