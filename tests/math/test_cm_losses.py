"""Losses: closed-form zeros, EDM loss expectation, stop-gradient, shared dropout masks, weighting."""

import copy
import math

import pytest
import torch
from torch import nn

from cmflow.diffusion import CDLoss, CTLoss, EDMLoss, ICTLoss, distance, heun_step, karras_sigmas
from cmflow.models import CMPrecond, EDMPrecond, make_unet

S, EPS = 0.5, 0.002


def gaussian_denoiser(x, sigma, class_labels=None):
    return x * S**2 / (S**2 + sigma**2)


def zero_denoiser(x, sigma, class_labels=None):
    return torch.zeros_like(x)


class GainTable(nn.Module):
    """f(x, sigma) = g(sigma) x with g tabulated on a grid (nearest grid point)."""

    def __init__(self, sigmas: torch.Tensor, gains: torch.Tensor):
        super().__init__()
        self.register_buffer("sigmas", sigmas.double())
        self.register_buffer("gains", gains.double())
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        idx = (s[:, None] - self.sigmas[None, :]).abs().argmin(dim=1)
        return x * (self.w * self.gains[idx]).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class ZeroDataCM(nn.Module):
    """The exact consistency function of data concentrated at 0: x_t = t z, f(x, t) = x eps / t."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None):
        return self.w * x * EPS / torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)


class MaskProbe(nn.Module):
    """Returns its own dropout mask, so d(online, target) == 0 iff both calls drew the same mask."""

    def __init__(self, p=0.5):
        super().__init__()
        self.drop = nn.Dropout(p)
        self.w = nn.Parameter(torch.ones(()))
        self.masks = []

    def forward(self, x, sigma, class_labels=None):
        m = self.drop(torch.ones_like(x))
        self.masks.append(m.detach().clone())
        return m * self.w


def heun_fixed_point_gains(sigmas):
    """Discrete consistency function of the Heun-discretised ODE: g_{n+1} = g_n h_n, g_0 = 1."""
    one = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    g = [1.0]
    for i in range(len(sigmas) - 1):
        g.append(g[-1] * float(heun_step(gaussian_denoiser, one, float(sigmas[i + 1]), float(sigmas[i]))))
    return torch.tensor(g, dtype=torch.float64)


def _images(b=64, shape=(1, 2, 2), seed=0, dtype=torch.float64):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * S


# ---------------------------------------------------------------- distance


def test_distances():
    x = torch.randn(3, 2, 4, 4)
    y = torch.randn(3, 2, 4, 4)
    v = (x - y).reshape(3, -1)
    torch.testing.assert_close(distance(x, y, "l2"), v.square().mean(1))
    torch.testing.assert_close(distance(x, y, "l1"), v.abs().mean(1))
    c = 0.00054 * math.sqrt(32)
    ph = distance(x, y, "pseudo_huber")
    torch.testing.assert_close(ph, (v.square().sum(1) + c**2).sqrt() - c)  # per-sample norm ...
    elementwise = ((v.square() + c**2).sqrt() - c).mean(1)
    assert not torch.allclose(ph, elementwise)  # ... not the element-wise Huber of diffusers' script
    torch.testing.assert_close(
        distance(x, y, "pseudo_huber", huber_c=0.1), (v.square().sum(1) + 0.01).sqrt() - 0.1
    )
    assert torch.equal(distance(x, x, "pseudo_huber"), torch.zeros(3))
    with pytest.raises(ValueError):
        distance(x, y, "lpips")


def test_lpips_adapter():
    seen = []

    class FakeLPIPS(nn.Module):
        def forward(self, a, b):
            seen.append((a, b))
            return (a - b).abs().mean(dim=(1, 2, 3))

    x, y = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    d = distance(x, y, "lpips", lpips=FakeLPIPS())
    a, b = seen[0]
    assert d.shape == (2,) and a.shape == (2, 3, 224, 224)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    with pytest.raises(ValueError):
        CDLoss(distance="lpips")


# ---------------------------------------------------------------- EDM loss


def test_edm_loss_ideal_denoiser_expectation_is_one():
    # For x0 ~ N(0, sd^2 I) the ideal denoiser has E(D - y)^2 = sd^2 sigma^2 / (sd^2 + sigma^2) per pixel, and
    # EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 is exactly its inverse: E[loss] = 1 for every sigma.
    loss_fn = EDMLoss()
    images = _images(4096, (1, 4, 4), dtype=torch.float32)
    loss = loss_fn(gaussian_denoiser, images, generator=torch.Generator().manual_seed(1))
    assert loss.shape == (4096,)
    assert float(loss.mean()) == pytest.approx(1.0, abs=0.03)
    worse = loss_fn(zero_denoiser, images, generator=torch.Generator().manual_seed(1))
    assert float(worse.mean()) > 1.5


def test_edm_loss_gradient():
    net = EDMPrecond(make_unet("tiny", 8, 1))
    loss = EDMLoss()(net, torch.rand(4, 1, 8, 8) * 2 - 1, generator=torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# ---------------------------------------------------------------- zero when online and target agree


def test_cd_loss_zero_at_discrete_fixed_point():
    n = 18
    sigmas = karras_sigmas(n)
    gains = heun_fixed_point_gains(sigmas)
    model = GainTable(sigmas, gains)
    images = _images(256)
    loss = CDLoss(num_scales=n)(
        model, model, gaussian_denoiser, images, generator=torch.Generator().manual_seed(0)
    )
    assert loss.shape == (256,) and float(loss.detach().max()) < 1e-20
    # the closed-form f* (exact ODE) is *not* a zero of the N = 18 loss: Heun's discretisation error shows
    exact = math.sqrt(S**2 + EPS**2) / (S**2 + sigmas**2).sqrt()
    model_exact = GainTable(sigmas, exact)
    loss_exact = CDLoss(num_scales=n)(model_exact, model_exact, gaussian_denoiser, images,
                                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert float(loss_exact.detach().mean()) > 1e-6


def test_ct_cd_ict_zero_for_exact_cm_of_zero_data():
    images = torch.zeros(128, 1, 2, 2, dtype=torch.float64)
    f = ZeroDataCM()
    gen = torch.Generator().manual_seed(0)
    cd = CDLoss(num_scales=40, distance="pseudo_huber")(f, f, zero_denoiser, images, generator=gen)
    ct = CTLoss()(f, f, images, num_scales=40, generator=gen)
    ict = ICTLoss()(f, images, num_scales=161, generator=gen)
    for loss in (cd, ct, ict):
        assert loss.shape == (128,) and float(loss.detach().abs().max()) < 1e-12
    # a function that is not consistent along x_t = t z (gain off by 1% per e-fold of t) is not a zero
    sigmas = karras_sigmas(40)
    inconsistent = GainTable(sigmas, EPS / sigmas * (1 + 0.01 * sigmas.log()))
    bad = CTLoss()(inconsistent, inconsistent, images, num_scales=40, generator=gen)
    assert float(bad.detach().min()) > 0.0


# ---------------------------------------------------------------- stop-gradient and dropout


def test_gradient_flows_only_to_online_network():
    torch.manual_seed(0)
    teacher = EDMPrecond(make_unet("tiny", 8, 1)).eval()
    student = CMPrecond.from_edm(teacher)
    target = copy.deepcopy(student)
    with torch.no_grad():
        for p in list(student.parameters()) + list(target.parameters()) + list(teacher.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    CDLoss()(student, target, teacher, images).mean().backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    student.zero_grad(set_to_none=True)
    CTLoss(num_scales=10)(student, target, images).mean().backward()
    assert all(p.grad is None for p in target.parameters())
    student.zero_grad(set_to_none=True)
    loss = ICTLoss(num_scales=11)(student, images)
    loss.mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("kind", ["cd", "ct", "ict"])
def test_online_and_target_share_dropout_masks(kind):
    torch.manual_seed(0)
    student = MaskProbe()
    target = copy.deepcopy(student)
    images = torch.zeros(32, 1, 4, 4)
    for _ in range(3):
        student.masks.clear()
        target.masks.clear()
        if kind == "cd":
            loss = CDLoss(num_scales=10)(student, target, zero_denoiser, images)
            pair = (student.masks[0], target.masks[0])
        elif kind == "ct":
            loss = CTLoss(num_scales=10)(student, target, images)
            pair = (student.masks[0], target.masks[0])
        else:
            loss = ICTLoss(num_scales=11)(student, images)
            pair = (student.masks[0], student.masks[1])
        assert torch.equal(*pair) and float(loss.detach().abs().max()) == 0.0
    # the masks are not frozen: successive loss calls draw new ones
    first = student.masks[0].clone()
    CTLoss(num_scales=10)(student, target, images)
    assert not torch.equal(first, student.masks[-1])
    # and the probe is sensitive: two unsynchronised calls differ
    assert not torch.equal(student(images, 1.0), student(images, 1.0))


# ---------------------------------------------------------------- grids, weights, indices


class SigmaRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.sigmas = []

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma).reshape(-1, 1, 1, 1).to(x.dtype)
        self.sigmas.append(s.flatten().clone())
        return self.w * s.expand_as(x)


def test_weighting_and_pairs():
    images = torch.zeros(256, 1, 2, 2, dtype=torch.float64)
    sigmas = karras_sigmas(12)
    for weighting in ("uniform", "inverse_dt"):
        rec = SigmaRecorder()
        loss = CTLoss(weighting=weighting, distance="l1")(rec, rec, images, num_scales=12)
        t_hi, t_lo = rec.sigmas
        assert bool((t_hi > t_lo).all())
        idx = torch.searchsorted(sigmas, t_lo)
        torch.testing.assert_close(t_hi, sigmas[idx + 1])  # consecutive grid points
        dt = t_hi - t_lo
        want = dt if weighting == "uniform" else torch.ones_like(dt)  # l1 = dt, times lambda
        torch.testing.assert_close(loss, want)
    rec = SigmaRecorder()
    CTLoss()(rec, rec, images, num_scales=2)  # N = 2: the only pair is (eps, T)
    assert bool((rec.sigmas[0] == 80.0).all()) and bool((rec.sigmas[1] == 0.002).all())
    with pytest.raises(ValueError, match="num_scales"):
        CTLoss()(rec, rec, images)


def test_cd_calls_teacher_twice_per_batch():
    calls = []

    def teacher(x, sigma, class_labels=None):
        calls.append(sigma)
        return gaussian_denoiser(x, sigma)

    f = ZeroDataCM()
    CDLoss(num_scales=18)(f, f, teacher, _images(8))
    assert len(calls) == 2
    assert bool((calls[0] > calls[1]).all())  # from t_{n+1} down to t_n


def test_ict_index_distribution_is_lognormal():
    rec = SigmaRecorder()
    images = torch.zeros(4000, 1, 1, 1, dtype=torch.float64)
    ICTLoss()(rec, images, num_scales=41, generator=torch.Generator().manual_seed(0))
    log_t = rec.sigmas[1].log()
    # median of the discretised lognormal(-1.1, 2.0) pair lower ends sits near exp(-1.1) (grid is coarse)
    assert -2.5 < float(log_t.median()) < 0.0
