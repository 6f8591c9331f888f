"""Zero-shot editing (CM Algorithm 4): the known part is kept, the rest is filled."""

import math

import pytest
import torch
import torch.nn.functional as F

from cmflow.diffusion import (
    colorization_basis,
    colorize,
    denoise,
    inpaint,
    karras_sigmas,
    patch_basis,
    slerp,
    super_resolve,
)
from cmflow.diffusion.editing import LUMA_WEIGHTS

S, EPS = 0.5, 0.002
SIGMAS = karras_sigmas(18).flip(0).tolist()  # t_1 = 80 > ... > t_N = eps


def gaussian_cm(x, sigma, class_labels=None):
    """The exact consistency function of N(0, S^2 I) data: f*(x, sigma) = x sqrt(S^2 + eps^2) / sqrt(S^2 + sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return x * math.sqrt(S**2 + EPS**2) / (S**2 + sigma**2).sqrt()


def _images(shape=(4, 3, 8, 8), seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1).clamp(-1, 1)


def test_bases_are_orthogonal_with_the_right_first_vector():
    q = colorization_basis()
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64))
    luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
    torch.testing.assert_close(q[:, 0], luma / luma.norm())
    for p in (1, 2, 3, 4):
        qp = patch_basis(p)
        torch.testing.assert_close(qp.T @ qp, torch.eye(p * p, dtype=torch.float64))
        torch.testing.assert_close(qp[:, 0], torch.full((p * p,), 1 / p, dtype=torch.float64))


def test_inpaint_keeps_known_pixels_exactly():
    images = _images()
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:6, 2:6] = True  # Omega: the centre is generated
    out = inpaint(gaussian_cm, images, mask, SIGMAS, torch.Generator().manual_seed(0))
    keep = ~mask.expand_as(images)
    assert torch.equal(out[keep], images[keep])
    filled = out[~keep]
    assert not torch.allclose(filled, images[~keep]) and float(filled.abs().max()) > 0
    assert float(filled.abs().max()) <= 1.0


def test_colorize_keeps_luminance():
    grey = _images((3, 1, 8, 8))
    out = colorize(gaussian_cm, grey, SIGMAS, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 8, 8)
    w = torch.tensor(LUMA_WEIGHTS).reshape(1, 3, 1, 1)
    lum_out = (out * w).sum(1, keepdim=True)
    lum_in = grey * sum(LUMA_WEIGHTS)  # luminance of the grey RGB image (Y, Y, Y)
    torch.testing.assert_close(lum_out, lum_in, rtol=0, atol=1e-5)
    assert float((out[:, 0] - out[:, 1]).abs().max()) > 1e-2  # colour was generated
    rgb = _images((2, 3, 8, 8), seed=3)  # an RGB input keeps its own luminance
    out_rgb = colorize(gaussian_cm, rgb, SIGMAS, torch.Generator().manual_seed(1))
    torch.testing.assert_close((out_rgb * w).sum(1), (rgb * w).sum(1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factor, res", [(2, 8), (3, 9), (4, 8)])
def test_super_resolve_keeps_patch_means(factor, res):
    hi = _images((2, 3, res, res), seed=factor)
    low = F.avg_pool2d(hi, factor)
    out = super_resolve(gaussian_cm, low, factor, SIGMAS, torch.Generator().manual_seed(0))
    assert out.shape == hi.shape
    torch.testing.assert_close(F.avg_pool2d(out, factor), low, rtol=0, atol=1e-5)
    nearest = low.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
    assert float((out - nearest).abs().max()) > 1e-2  # detail was generated within patches


def test_editing_nfe_and_reproducibility():
    calls = []

    def counting(x, sigma, class_labels=None):
        calls.append(sigma)
        return gaussian_cm(x, sigma)

    images, mask = _images(), torch.rand(1, 1, 8, 8) > 0.5
    a = inpaint(counting, images, mask, SIGMAS, torch.Generator().manual_seed(0))
    assert calls == SIGMAS
    b = inpaint(gaussian_cm, images, mask, SIGMAS, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_denoise_is_one_step():
    x0 = _images((2, 3, 8, 8))
    noisy = x0 + 0.296 * torch.randn_like(x0)
    torch.testing.assert_close(denoise(gaussian_cm, noisy, 0.296), gaussian_cm(noisy, 0.296).clamp(-1, 1))


def test_slerp():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    z1n = z1 * (z0.flatten(1).norm(dim=1) / z1.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    mid = slerp(z0, z1n, 0.5)
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1))  # stays on the sphere

    def angle(a, b):
        return torch.arccos(F.cosine_similarity(a.flatten(1), b.flatten(1)))

    torch.testing.assert_close(angle(z0, mid), angle(z0, z1n) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(slerp(z0, z0, 0.3), z0)  # degenerate angle falls back to lerp
    per_sample = slerp(z0, z1, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(per_sample[1], z1[1])
