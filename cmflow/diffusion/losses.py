"""Training losses as small callables (EDM ``training/loss.py`` contract).

Hyperparameters go to ``__init__``; ``__call__`` samples noise levels and noise, evaluates the networks and
returns the **unreduced, weighted, per-sample** loss of shape (B,). Reduction, loss scaling, ``backward`` and
EMA updates belong to the training loop.

* :class:`EDMLoss` -- the teacher's denoising loss (EDM Eq. (2), Table 1).
* :class:`CDLoss` -- consistency distillation, CM Eq. (7)/(8), Algorithm 2 (one Heun teacher step).
* :class:`CTLoss` -- consistency training, CM Eq. (10), Algorithm 3 (Euler step with the clean sample).
* :class:`ICTLoss` -- improved CT (iCT): target = stop-grad(student) (mu = 0), pseudo-Huber metric,
  discretised lognormal noise levels, lambda = 1 / (t_{n+1} - t_n).

Grid conventions are those of :mod:`cmflow.diffusion.noise_levels` (ascending, pair index n in {0..N-2}).
Networks are called as ``net(x, sigma, class_labels=...)`` with ``sigma`` of shape (B, 1, 1, 1). The online
and target consistency evaluations run through :func:`~cmflow.diffusion.rng.call_with_shared_rng`, so they
see the same dropout masks, drawn from the generator of the device the inputs (and so the model) live on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmflow.diffusion.noise_levels import karras_sigmas, sample_lognormal_indices, sample_uniform_indices
from cmflow.diffusion.rng import Generator, call_with_shared_rng, randn, randn_like
from cmflow.diffusion.solvers import heun_step

__all__ = ["CDLoss", "CTLoss", "EDMLoss", "ICTLoss", "default_huber_c", "distance"]

DistanceKind = Literal["l2", "l1", "pseudo_huber", "lpips"]
Weighting = Literal["uniform", "inverse_dt"]
Net = Callable[..., Tensor]


def default_huber_c(x: Tensor) -> float:
    """iCT pseudo-Huber constant c = 0.00054 sqrt(d), d = C H W (0.0299 CIFAR-10, 0.0599 ImageNet-64)."""
    return 0.00054 * math.sqrt(x[0].numel())


def _lpips_distance(x: Tensor, y: Tensor, lpips: nn.Module) -> Tensor:
    """LPIPS as in the openai CD code: bilinear resize to 224 below 256 px, inputs mapped to [0, 1]."""
    if x.shape[1] == 1:  # grey images: LPIPS networks expect RGB
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    if x.shape[-1] < 256:
        x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=224, mode="bilinear", align_corners=False)
    return lpips((x + 1) / 2, (y + 1) / 2).reshape(x.shape[0], -1).mean(dim=1)


def distance(
    x: Tensor,
    y: Tensor,
    kind: DistanceKind = "l2",
    *,
    huber_c: float | None = None,
    lpips: nn.Module | None = None,
) -> Tensor:
    """Per-sample distance d(x, y), shape (B,) (the CM metrics and iCT's pseudo-Huber).

    * ``"l2"``: mean over C, H, W of (x - y)^2 (squared l2 / d, as the openai and JAX code).
    * ``"l1"``: mean of |x - y|.
    * ``"pseudo_huber"``: sqrt(||x - y||_2^2 + c^2) - c on the **per-sample** l2 norm over the whole image
      vector (not element-wise); ``huber_c`` defaults to 0.00054 sqrt(d).
    * ``"lpips"``: ``lpips(a, b)`` on images mapped to [0, 1] (see :func:`_lpips_distance`); ``lpips`` is any
      module returning one distance per sample (e.g. ``piq.LPIPS(replace_pooling=True, reduction="none")``).
    """
    diff = (x - y).reshape(x.shape[0], -1)
    if kind == "l2":
        return diff.square().mean(dim=1)
    if kind == "l1":
        return diff.abs().mean(dim=1)
    if kind == "pseudo_huber":
        c = default_huber_c(x) if huber_c is None else huber_c
        return (diff.square().sum(dim=1) + c**2).sqrt() - c
    if kind == "lpips":
        if lpips is None:
            raise ValueError(
                "distance 'lpips' needs an LPIPS module (load its weights by URI and pass lpips=...)"
            )
        return _lpips_distance(x, y, lpips)
    raise ValueError(f"unknown distance {kind!r}; choose l2, l1, pseudo_huber or lpips")


def _sigma_col(sigmas: Tensor, idx: Tensor, like: Tensor) -> Tensor:
    return sigmas[idx].to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))


class EDMLoss:
    """EDM denoising loss (EDM Eq. (2), (8), Table 1).

    ln sigma ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
    ``__call__(net, images, class_labels=None, generator=None)`` returns
    lambda(sigma) mean_CHW (D(y + sigma n; sigma) - y)^2, shape (B,). EDM returns the per-pixel tensor and sums
    it in the loop; the per-pixel mean differs by the constant C H W, which Adam-type optimisers ignore.
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5) -> None:
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def __call__(
        self, net: Net, images: Tensor, class_labels: Tensor | None = None, generator: Generator | None = None
    ) -> Tensor:
        b = images.shape[0]
        rnd = randn((b, 1, 1, 1), generator=generator, dtype=images.dtype, device=images.device)
        sigma = (rnd * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noisy = images + sigma * randn_like(images, generator)
        denoised = net(noisy, sigma, class_labels=class_labels)
        return weight.reshape(b) * distance(denoised, images, "l2")


class _ConsistencyLoss:
    """Shared parts of CD / CT / iCT: Karras grid, index sampling, weighting, the online/target pair."""

    def __init__(
        self,
        num_scales: int | None,
        sigma_min: float,
        sigma_max: float,
        rho: float,
        distance: DistanceKind,
        weighting: Weighting,
        lpips: nn.Module | None,
        huber_c: float | None,
    ) -> None:
        if distance == "lpips" and lpips is None:
            raise ValueError("distance='lpips' needs lpips=<module>")
        if weighting not in ("uniform", "inverse_dt"):
            raise ValueError(f"unknown weighting {weighting!r}; choose uniform or inverse_dt")
        self.num_scales, self.sigma_min, self.sigma_max, self.rho = num_scales, sigma_min, sigma_max, rho
        self.distance, self.weighting, self.lpips, self.huber_c = distance, weighting, lpips, huber_c

    def sigmas(self, num_scales: int | None) -> Tensor:
        """The ascending float64 grid of this call (``num_scales`` overrides the constructor's: curricula)."""
        n = num_scales if num_scales is not None else self.num_scales
        if n is None:
            raise ValueError("num_scales must be given, at construction or per call")
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)

    def sample_indices(self, num: int, sigmas: Tensor, generator: Generator | None) -> Tensor:
        return sample_uniform_indices(num, len(sigmas), generator)

    def weight(self, sigmas: Tensor, idx: Tensor, like: Tensor) -> Tensor:
        """lambda(t_n): 1, or 1 / (t_{n+1} - t_n) computed on the float64 grid (iCT)."""
        if self.weighting == "uniform":
            return torch.ones(len(idx), dtype=like.dtype, device=like.device)
        return (1 / (sigmas[idx + 1] - sigmas[idx])).to(dtype=like.dtype, device=like.device)

    def pair_loss(
        self,
        student: Net,
        target: Net,
        x_hi: Tensor,
        t_hi: Tensor,
        x_lo: Tensor,
        t_lo: Tensor,
        class_labels: Tensor | None,
    ) -> Tensor:
        """d(f_theta(x_{t_{n+1}}, t_{n+1}), stopgrad f_theta-(x_{t_n}, t_n)), shared dropout masks; (B,)."""

        def online() -> Tensor:
            return student(x_hi, t_hi, class_labels=class_labels)

        def offline() -> Tensor:
            with torch.no_grad():
                return target(x_lo, t_lo, class_labels=class_labels)

        out, tgt = call_with_shared_rng(x_hi.device, online, offline)  # inputs live where the model does
        return distance(out, tgt.detach(), self.distance, huber_c=self.huber_c, lpips=self.lpips)


class CDLoss(_ConsistencyLoss):
    """Consistency distillation loss L_CD^N (CM Eq. (7)/(8), Algorithm 2).

    n ~ U{0..N-2}; x_{t_{n+1}} = x + t_{n+1} z; x^_{t_n} = one Heun step of the teacher from t_{n+1} to
    t_n (no grad); loss = lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^_{t_n}, t_n)), f_theta-
    under no grad. ``teacher`` is a denoiser D(x; sigma) in eval mode; ``target`` is the EMA network theta-
    (pass the student itself for mu = 0, the CIFAR-10 setting).
    """

    def __init__(
        self,
        num_scales: int = 18,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        distance: DistanceKind = "l2",
        weighting: Weighting = "uniform",
        lpips: nn.Module | None = None,
        huber_c: float | None = None,
    ) -> None:
        super().__init__(num_scales, sigma_min, sigma_max, rho, distance, weighting, lpips, huber_c)

    def __call__(
        self,
        student: Net,
        target: Net,
        teacher: Net,
        images: Tensor,
        class_labels: Tensor | None = None,
        generator: Generator | None = None,
        num_scales: int | None = None,
    ) -> Tensor:
        sigmas = self.sigmas(num_scales)
        idx = self.sample_indices(images.shape[0], sigmas, generator)  # (B,)
        t_hi, t_lo = _sigma_col(sigmas, idx + 1, images), _sigma_col(sigmas, idx, images)  # (B, 1, 1, 1)
        x_hi = images + t_hi * randn_like(images, generator)
        with torch.no_grad():
            x_lo = heun_step(teacher, x_hi, t_hi, t_lo, class_labels)
        return self.weight(sigmas, idx, images) * self.pair_loss(
            student, target, x_hi, t_hi, x_lo, t_lo, class_labels
        )


class CTLoss(_ConsistencyLoss):
    """Consistency training loss L_CT^N (CM Eq. (10), Algorithm 3).

    n ~ U{0..N-2}, z ~ N(0, I); student input x + t_{n+1} z, target input x + t_n z (the same z). This is
    the Euler step of CD with D(x_t, t) replaced by the clean sample x:
    x_{t_{n+1}} + (t_n - t_{n+1}) (x_{t_{n+1}} - x) / t_{n+1} = x + t_n z (reference Sec. 2.2).
    ``num_scales`` may be given per call (curriculum N(k), :func:`~cmflow.diffusion.noise_levels.ct_num_steps`).
    """

    def __init__(
        self,
        num_scales: int | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        distance: DistanceKind = "l2",
        weighting: Weighting = "uniform",
        lpips: nn.Module | None = None,
        huber_c: float | None = None,
    ) -> None:
        super().__init__(num_scales, sigma_min, sigma_max, rho, distance, weighting, lpips, huber_c)

    def __call__(
        self,
        student: Net,
        target: Net,
        images: Tensor,
        num_scales: int | None = None,
        class_labels: Tensor | None = None,
        generator: Generator | None = None,
    ) -> Tensor:
        sigmas = self.sigmas(num_scales)
        idx = self.sample_indices(images.shape[0], sigmas, generator)
        t_hi, t_lo = _sigma_col(sigmas, idx + 1, images), _sigma_col(sigmas, idx, images)
        z = randn_like(images, generator)
        x_hi, x_lo = images + t_hi * z, images + t_lo * z
        return self.weight(sigmas, idx, images) * self.pair_loss(
            student, target, x_hi, t_hi, x_lo, t_lo, class_labels
        )


class ICTLoss(CTLoss):
    """Improved consistency training (iCT, Song & Dhariwal 2023).

    Differences from :class:`CTLoss`: the target is the student itself under stop-gradient (mu = 0, no EMA
    teacher), d = pseudo-Huber on the per-sample norm with c = 0.00054 sqrt(d), n drawn from the discretised
    lognormal (P_mean = -1.1, P_std = 2.0; :func:`~cmflow.diffusion.noise_levels.ict_index_probs`) and
    lambda = 1 / (t_{n+1} - t_n). ``num_scales`` follows :func:`~cmflow.diffusion.noise_levels.ict_num_steps`.

    ``__call__(student, images, num_scales=None, class_labels=None, generator=None, target=None)``; the
    target is ``student`` under no_grad unless ``target`` names the same weights in another module (the bare
    network when ``student`` is its DistributedDataParallel wrapper, so the target pass does not sync).
    """

    def __init__(
        self,
        num_scales: int | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        huber_c: float | None = None,
        distance: DistanceKind = "pseudo_huber",
        weighting: Weighting = "inverse_dt",
        lpips: nn.Module | None = None,
    ) -> None:
        super().__init__(num_scales, sigma_min, sigma_max, rho, distance, weighting, lpips, huber_c)
        self.p_mean, self.p_std = p_mean, p_std

    def sample_indices(self, num: int, sigmas: Tensor, generator: Generator | None) -> Tensor:
        return sample_lognormal_indices(num, sigmas, generator, self.p_mean, self.p_std)

    def __call__(  # type: ignore[override]
        self,
        student: Net,
        images: Tensor,
        num_scales: int | None = None,
        class_labels: Tensor | None = None,
        generator: Generator | None = None,
        target: Net | None = None,
    ) -> Tensor:
        return super().__call__(
            student, student if target is None else target, images, num_scales, class_labels, generator
        )
