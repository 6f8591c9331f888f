"""One-step solvers of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

This is EDM Eq. (1) with Eq. (3), sigma(t) = t and s(t) = 1 (the VE / CM convention). ``denoiser(x, sigma,
class_labels=...)`` is any D(x; sigma) (e.g. :class:`~cmflow.models.EDMPrecond`); it is called with ``sigma``
broadcastable against ``x`` (shape (B, 1, ..., 1)). ``t`` and ``t_next`` may be floats or (B,) tensors (one
noise level per sample, as in CD). Both functions are pure: no RNG, no state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Denoiser", "euler_step", "heun_step"]

Denoiser = Callable[..., Tensor]  # denoiser(x, sigma, class_labels=None) -> D(x; sigma)


def _level(t: float | Tensor, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1)))  # (B or 1, 1, ..., 1)


def euler_step(
    denoiser: Denoiser,
    x: Tensor,
    t: float | Tensor,
    t_next: float | Tensor,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Euler step x' = x + (t' - t) d with d = (x - D(x; t)) / t (CM Eq. (6) with Euler; 1 NFE)."""
    t, t_next = _level(t, x), _level(t_next, x)
    d = (x - denoiser(x, t, class_labels=class_labels)) / t
    return x + (t_next - t) * d


def heun_step(
    denoiser: Denoiser,
    x: Tensor,
    t: float | Tensor,
    t_next: float | Tensor,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Heun step from ``t`` to ``t_next`` > 0 (EDM Alg. 1; the CD teacher solver, 2 NFE).

    d = (x - D(x; t)) / t;  x~ = x + (t' - t) d;  d' = (x~ - D(x~; t')) / t';  x' = x + (t' - t)(d + d') / 2.
    """
    t, t_next = _level(t, x), _level(t_next, x)
    if bool((t_next <= 0).any()):
        raise ValueError("heun_step needs t_next > 0; use euler_step for the final step to sigma = 0")
    d = (x - denoiser(x, t, class_labels=class_labels)) / t
    x_euler = x + (t_next - t) * d
    d_next = (x_euler - denoiser(x_euler, t_next, class_labels=class_labels)) / t_next
    return x + (t_next - t) * (0.5 * d + 0.5 * d_next)
