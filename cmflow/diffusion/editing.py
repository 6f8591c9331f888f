"""Zero-shot editing with a consistency model (CM Algorithm 4, Sec. 6 / App. D).

Given an invertible linear map A and the set of coordinates of A y that are known, every step is
"add noise, apply f, then put the known coordinates back":

1. y <- A^-1[(A y) on the known part, 0 elsewhere];  x <- f(y + t_1 z, t_1)
2. for n = 2..N: x <- f(x + sqrt(t_n^2 - eps^2) z, t_n)
3. after each f: x <- A^-1[(A y) on the known part, (A x) elsewhere]

Every f output is clamped to [-1, 1] before the replacement (openai code). The paper writes the mask Omega as
1 on the coordinates to *generate*; internally ``keep`` is its complement. The replacement uses
``torch.where`` so that with A = identity the known pixels are copied bit-exactly; for orthogonal A they are
kept up to float rounding. Images are (B, C, H, W) in [-1, 1]; ``sigmas`` are decreasing (t_1 > ... > t_N),
typically the whole descending training grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cmflow.diffusion.rng import Generator, randn_like

__all__ = [
    "LUMA_WEIGHTS",
    "colorization_basis",
    "colorize",
    "denoise",
    "edit",
    "inpaint",
    "patch_basis",
    "slerp",
    "super_resolve",
]

Model = Callable[..., Tensor]  # f(x, sigma, class_labels=None)
Transform = Callable[[Tensor], Tensor]

LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luminance, as in the CM colorisation code


def _orthonormal_completion(first: Tensor) -> Tensor:
    """Orthogonal (d, d) Q with Q[:, 0] = first / ||first||, completed by QR of [first, e_i, ...]."""
    d = first.numel()
    m = torch.eye(d, dtype=torch.float64)
    j = int(first.abs().argmax())  # drop the basis vector most aligned with `first` to keep M invertible
    cols = [first.to(torch.float64)] + [m[:, i] for i in range(d) if i != j]
    q, r = torch.linalg.qr(torch.stack(cols, dim=1))
    return q * torch.sign(torch.diagonal(r))[None, :]  # diag(R) > 0: unique Q, Q[:, 0] = +first/||first||


def colorization_basis() -> Tensor:
    """3x3 orthogonal Q (float64) whose first column is the unit luminance direction (0.2989, 0.587, 0.114)."""
    return _orthonormal_completion(torch.tensor(LUMA_WEIGHTS, dtype=torch.float64))


def patch_basis(factor: int) -> Tensor:
    """(p^2, p^2) orthogonal Q (float64), p = ``factor``, whose first column is the unit all-ones vector.

    Coefficient 0 of a flattened p x p patch is p times its mean: keeping it keeps the low-resolution image.
    """
    if factor < 1:
        raise ValueError("factor must be >= 1")
    return _orthonormal_completion(torch.ones(factor * factor, dtype=torch.float64))


@torch.no_grad()
def edit(
    model: Model,
    reference: Tensor,
    keep: Tensor,
    sigmas: Sequence[float],
    *,
    transform: Transform | None = None,
    inverse: Transform | None = None,
    generator: Generator | None = None,
    sigma_min: float = 0.002,
    class_labels: Tensor | None = None,
) -> Tensor:
    """CM Algorithm 4 for an invertible linear A (``transform``, inverse ``inverse``; default identity).

    ``keep`` is a bool tensor broadcastable to ``transform(reference)``: True where A y is known (1 - Omega).
    """
    if not sigmas:
        raise ValueError("sigmas must contain at least one noise level")
    A = transform or (lambda t: t)
    A_inv = inverse or (lambda t: t)
    keep = keep.to(torch.bool)
    known = A(reference)

    def replace(x: Tensor) -> Tensor:
        return A_inv(torch.where(keep, known, A(x)))

    y = A_inv(torch.where(keep, known, torch.zeros_like(known)))
    x = y
    for i, sigma in enumerate(float(s) for s in sigmas):
        std = sigma if i == 0 else math.sqrt(sigma**2 - sigma_min**2)
        x = x + std * randn_like(x, generator)
        x = replace(model(x, sigma, class_labels=class_labels).clamp(-1, 1))
    return x


@torch.no_grad()
def inpaint(
    model: Model,
    images: Tensor,
    mask: Tensor,
    sigmas: Sequence[float],
    generator: Generator | None = None,
    *,
    sigma_min: float = 0.002,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Inpainting: ``mask`` (Omega, broadcastable to ``images``) is 1/True on the pixels to generate.

    Pixels where ``mask`` is 0 are copied bit-exactly from ``images``.
    """
    keep = ~torch.broadcast_to(mask.to(torch.bool).to(images.device), images.shape)
    return edit(
        model, images, keep, sigmas, generator=generator, sigma_min=sigma_min, class_labels=class_labels
    )


def _to_color_space(x: Tensor, q: Tensor) -> Tensor:
    return torch.einsum("bchw,cj->bjhw", x, q)


def _from_color_space(c: Tensor, q: Tensor) -> Tensor:
    return torch.einsum("bjhw,cj->bchw", c, q)


@torch.no_grad()
def colorize(
    model: Model,
    grey_images: Tensor,
    sigmas: Sequence[float],
    generator: Generator | None = None,
    *,
    sigma_min: float = 0.002,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Colorisation: keep the luminance coordinate of Q^T x per pixel, generate the 2 chroma coordinates.

    ``grey_images`` is (B, 1, H, W) (replicated to 3 equal channels) or (B, 3, H, W); the output is RGB with
    the same luminance 0.2989 R + 0.587 G + 0.114 B as the (replicated) input, up to float rounding.
    """
    ref = grey_images.expand(-1, 3, -1, -1) if grey_images.shape[1] == 1 else grey_images
    if ref.shape[1] != 3:
        raise ValueError(f"colorize needs 1- or 3-channel images, got {grey_images.shape[1]} channels")
    q = colorization_basis().to(dtype=ref.dtype, device=ref.device)
    keep = torch.tensor([True, False, False], device=ref.device).reshape(1, 3, 1, 1)
    return edit(
        model,
        ref,
        keep,
        sigmas,
        transform=lambda x: _to_color_space(x, q),
        inverse=lambda c: _from_color_space(c, q),
        generator=generator,
        sigma_min=sigma_min,
        class_labels=class_labels,
    )


def _to_patches(x: Tensor, p: int, q: Tensor) -> Tensor:
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)  # (B, C, h, w, p, p)
    return patches.reshape(b, c, h // p, w // p, p * p) @ q  # (B, C, h, w, p^2) coefficients


def _from_patches(coef: Tensor, p: int, q: Tensor) -> Tensor:
    b, c, h, w, _ = coef.shape
    patches = (coef @ q.T).reshape(b, c, h, w, p, p).permute(0, 1, 2, 4, 3, 5)
    return patches.reshape(b, c, h * p, w * p)


@torch.no_grad()
def super_resolve(
    model: Model,
    low_res: Tensor,
    factor: int,
    sigmas: Sequence[float],
    generator: Generator | None = None,
    *,
    sigma_min: float = 0.002,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Super-resolution by an integer ``factor`` p: keep each p x p patch mean (the low-res pixel).

    ``low_res`` is (B, C, H/p, W/p); the output is (B, C, H, W) with ``avg_pool2d(out, p) == low_res`` up to
    float rounding.
    """
    p = int(factor)
    ref = low_res.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)  # patch mean = low-res pixel
    q = patch_basis(p).to(dtype=ref.dtype, device=ref.device)
    keep = torch.zeros(p * p, dtype=torch.bool, device=ref.device)
    keep[0] = True
    return edit(
        model,
        ref,
        keep,
        sigmas,
        transform=lambda x: _to_patches(x, p, q),
        inverse=lambda c: _from_patches(c, p, q),
        generator=generator,
        sigma_min=sigma_min,
        class_labels=class_labels,
    )


@torch.no_grad()
def denoise(model: Model, noisy: Tensor, sigma: float, *, class_labels: Tensor | None = None) -> Tensor:
    """One-step denoising of an image carrying Gaussian noise of std ``sigma``: f(noisy, sigma), clamped."""
    return model(noisy, float(sigma), class_labels=class_labels).clamp(-1, 1)


def slerp(z0: Tensor, z1: Tensor, alpha: float | Tensor) -> Tensor:
    """Spherical interpolation between latents, per sample over the flattened C H W vector (CM Sec. 6).

    slerp = sin((1 - a) theta) / sin(theta) z0 + sin(a theta) / sin(theta) z1 with theta = angle(z0, z1);
    falls back to linear interpolation when sin(theta) ~ 0. ``alpha`` is a float or a (B,) tensor.
    """
    b = z0.shape[0]
    a = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(-1, 1).expand(b, 1)
    u, v = z0.reshape(b, -1), z1.reshape(b, -1)
    cos = (u * v).sum(1, keepdim=True) / (u.norm(dim=1, keepdim=True) * v.norm(dim=1, keepdim=True))
    theta = cos.clamp(-1, 1).acos()
    sin = theta.sin()
    small = sin.abs() < 1e-6
    safe_sin = torch.where(small, torch.ones_like(sin), sin)
    w0 = torch.where(small, 1 - a, ((1 - a) * theta).sin() / safe_sin)
    w1 = torch.where(small, a, (a * theta).sin() / safe_sin)
    return (w0 * u + w1 * v).reshape(z0.shape)
