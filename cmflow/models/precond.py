"""Preconditioning wrappers: any backbone ``F(x, noise_labels, class_labels)`` becomes a denoiser or a CM.

* :class:`EDMPrecond` -- the EDM denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM Eq. (7),
  Table 1), used for the teacher.
* :class:`CMPrecond` -- the consistency function f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t))
  with the boundary-condition scalings of CM Eq. (5) / App. C, shifted by eps = sigma_min so that
  c_skip(eps) = 1 and c_out(eps) = 0, hence f(x, eps) == x bit-exactly for any backbone.

Both feed the backbone c_noise = ``c_noise_scale`` ln sigma, a recorded config value (``model.json``
``precond.c_noise_scale``): 1/4 by default (EDM Table 1; the JAX CM code for CIFAR-10), 250 for the ADM
checkpoints of openai/consistency_models (``KarrasDenoiser.denoise``: 1000 * 0.25 * ln(sigma + 1e-44); the
1e-44 changes nothing for sigma >= sigma_min, so it is left out). Scalings are computed in float32, or in
float64 when ``x`` is float64 (the EDM sampler runs in float64); c_noise is evaluated in float64 and then
rounded, so a large scale does not amplify float32 rounding of ln sigma (250 ln 80 ~ 1095, where one float32
ulp is 1.2e-4).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["CMPrecond", "EDMPrecond", "cm_scalings", "edm_scalings", "sigma_as_tensor"]

Scalings = tuple[Tensor, Tensor, Tensor, Tensor]


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5, c_noise_scale: float = 0.25) -> Scalings:
    """EDM Table 1 preconditioning: returns (c_skip, c_out, c_in, c_noise) for noise level ``sigma``.

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = c_noise_scale ln sigma (1/4 in EDM; 250 for the
    openai ADM checkpoints).
    """
    sigma = torch.as_tensor(sigma)
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = _c_noise(sigma, c_noise_scale)
    return c_skip, c_out, c_in, c_noise


def cm_scalings(
    sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002, c_noise_scale: float = 0.25
) -> Scalings:
    """Consistency-model scalings with the boundary condition at eps = ``sigma_min`` (CM Eq. (5), App. C).

    c_skip = sigma_data^2 / ((sigma - eps)^2 + sigma_data^2),
    c_out = sigma_data (sigma - eps) / sqrt(sigma_data^2 + sigma^2)  (the shift is in the numerator only),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),  c_noise = c_noise_scale ln sigma.
    ``sigma - eps`` is formed first, so at sigma == eps (same dtype) it is exactly 0 and c_skip = 1, c_out = 0
    hold exactly.
    """
    sigma = torch.as_tensor(sigma)
    sd2 = sigma_data**2
    delta = sigma - sigma_min  # exactly 0 at sigma == sigma_min
    c_skip = sd2 / (delta**2 + sd2)
    c_out = sigma_data * delta / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = _c_noise(sigma, c_noise_scale)
    return c_skip, c_out, c_in, c_noise


def _c_noise(sigma: Tensor, c_noise_scale: float) -> Tensor:
    """c_noise = c_noise_scale ln sigma, evaluated in float64 and returned in sigma's dtype."""
    return (sigma.to(torch.float64).log() * c_noise_scale).to(sigma.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _backbone_dtype(backbone: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in backbone.parameters():
        return p.dtype
    return default


def sigma_as_tensor(sigma: float | Tensor, x: Tensor) -> Tensor:
    """``sigma`` (float, (B,) or (B, 1, 1, 1)) as a tensor of x's dtype/device broadcastable to (B, 1, ...,
    1)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class _Precond(nn.Module):
    """Shared body of the two wrappers: out = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(
        self,
        backbone: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        c_noise_scale: float = 0.25,
    ) -> None:
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not c_noise_scale > 0:
            raise ValueError(f"c_noise_scale must be > 0, got {c_noise_scale}")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.c_noise_scale = float(c_noise_scale)

    def scalings(self, sigma: Tensor) -> Scalings:
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        dtype = _compute_dtype(x)
        x = x.to(dtype)  # (B, C, H, W)
        sigma = sigma_as_tensor(sigma, x)  # (B or 1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        noise_labels = c_noise.reshape(-1).expand(x.shape[0])  # (B,)
        F_x = self.backbone((c_in * x).to(_backbone_dtype(self.backbone, dtype)), noise_labels, class_labels)
        return c_skip * x + c_out * F_x.to(dtype)


class EDMPrecond(_Precond):
    """EDM denoiser D(x; sigma) around ``backbone`` (EDM Table 1, sigma_data = 0.5); the teacher.

    ``forward(x, sigma, class_labels=None)``: ``sigma`` may be a float, a (B,) tensor or (B, 1, 1, 1).
    """

    def scalings(self, sigma: Tensor) -> Scalings:
        return edm_scalings(sigma, self.sigma_data, self.c_noise_scale)


class CMPrecond(_Precond):
    """Consistency function f(x, sigma) around ``backbone`` with f(x, sigma_min) == x exactly (CM Eq. (5)).

    ``forward(x, sigma, class_labels=None)``: ``sigma`` may be a float, a (B,) tensor or (B, 1, 1, 1), with
    sigma_min <= sigma <= sigma_max.
    """

    def scalings(self, sigma: Tensor) -> Scalings:
        return cm_scalings(sigma, self.sigma_data, self.sigma_min, self.c_noise_scale)

    @classmethod
    def from_edm(cls, edm: EDMPrecond) -> CMPrecond:
        """A student whose backbone is a deep copy of the teacher's (CD initialises theta <- phi, CM Alg.
        2)."""
        return cls(
            copy.deepcopy(edm.backbone), edm.sigma_data, edm.sigma_min, edm.sigma_max, edm.c_noise_scale
        )
