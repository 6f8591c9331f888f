"""Preconditioning: EDM Table 1 and the CM boundary condition (CM Eq. (7), App. C)."""

import math

import pytest
import torch
from torch import nn

from cmflow.models import CMPrecond, EDMPrecond, cm_scalings, edm_scalings, make_unet


def _random_unet(seed: int = 0, **kw) -> nn.Module:
    """A tiny UNet with every parameter perturbed, so the zero-initialised output layer is not zero."""
    torch.manual_seed(seed)
    net = make_unet("tiny", 8, 1, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return net


def test_boundary_condition_is_bit_exact():
    net = _random_unet()
    f = CMPrecond(net)
    x = torch.randn(5, 1, 8, 8) * 3
    F_out = net(x, torch.zeros(5))
    assert F_out.abs().max() > 0.1  # the backbone is far from zero, so c_out must be exactly 0
    for sigma in (0.002, torch.full((5,), 0.002), torch.full((5, 1, 1, 1), 0.002)):
        assert torch.equal(f(x, sigma), x)
    x64 = x.double()
    out64 = f(x64, 0.002)
    assert out64.dtype == torch.float64 and torch.equal(out64, x64)
    assert not torch.equal(f(x, 0.0021), x)  # and it is not the identity elsewhere


@pytest.mark.parametrize(
    "t, expected",
    [  # (c_skip, c_out, c_in) at the reference points of the reference doc, Sec. 1.1
        (0.01, (0.99974, 0.00800, 1.9996)),
        (0.5, (0.5020, 0.3521, 1.4142)),
        (1.0, (0.2006, 0.4463, 0.8944)),
        (80.0, (3.9e-5, 0.49998, 0.0125)),
    ],
)
def test_cm_scalings_reference_points(t, expected):
    c_skip, c_out, c_in, c_noise = cm_scalings(torch.tensor(t, dtype=torch.float64))
    for got, want in zip((c_skip, c_out, c_in), expected, strict=True):
        assert float(got) == pytest.approx(want, rel=2e-3)
    assert float(c_noise) == pytest.approx(math.log(t) / 4, rel=1e-12)


def test_cm_scalings_exact_at_eps():
    for dtype in (torch.float32, torch.float64):
        c_skip, c_out, _, _ = cm_scalings(torch.tensor(0.002, dtype=dtype))
        assert float(c_skip) == 1.0 and float(c_out) == 0.0


def test_edm_scalings_closed_form():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
    sd = 0.5
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # at sigma = sigma_data: c_skip = 1/2, c_out = c_in^-1 / 4 = sqrt(2)/4, c_in = sqrt(2)
    assert float(c_skip[1]) == pytest.approx(0.5)
    assert float(c_out[1]) == pytest.approx(math.sqrt(2) / 4)
    assert float(c_in[1]) == pytest.approx(math.sqrt(2))
    # EDM App. B.6: the effective training target of F, (y - c_skip (y + n)) / c_out, has unit variance
    var_target = (1 - c_skip) ** 2 * sd**2 / c_out**2 + c_skip**2 * sigma**2 / c_out**2
    torch.testing.assert_close(var_target, torch.ones_like(sigma))


class _Recorder(nn.Module):
    """Backbone returning a fixed tensor and recording its inputs."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, noise_labels, class_labels=None):
        self.calls.append((x.clone(), noise_labels.clone()))
        return self.out


@pytest.mark.parametrize("cls, scalings", [(EDMPrecond, edm_scalings), (CMPrecond, cm_scalings)])
def test_precond_formula(cls, scalings):
    x = torch.randn(3, 1, 4, 4)
    F_x = torch.randn(3, 1, 4, 4)
    rec = _Recorder(F_x)
    sigma = torch.tensor([0.1, 1.0, 30.0])
    out = cls(rec)(x, sigma)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in scalings(sigma))
    torch.testing.assert_close(out, c_skip * x + c_out * F_x)
    x_in, labels = rec.calls[0]
    torch.testing.assert_close(x_in, c_in * x)
    torch.testing.assert_close(labels, c_noise.flatten())


def test_sigma_shapes_agree():
    f = CMPrecond(_random_unet())
    x = torch.randn(4, 1, 8, 8)
    a = f(x, 0.7)
    b = f(x, torch.full((4,), 0.7))
    c = f(x, torch.full((4, 1, 1, 1), 0.7))
    assert torch.equal(a, b) and torch.equal(b, c)


def test_attributes_and_from_edm_copies_weights():
    teacher = EDMPrecond(_random_unet(), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    student = CMPrecond.from_edm(teacher)
    assert (student.sigma_data, student.sigma_min, student.sigma_max) == (0.5, 0.002, 80.0)
    assert student.backbone is not teacher.backbone
    for (n1, p1), (n2, p2) in zip(
        teacher.backbone.state_dict().items(), student.backbone.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    with torch.no_grad():
        next(student.backbone.parameters()).add_(1.0)
    assert not torch.equal(next(student.backbone.parameters()), next(teacher.backbone.parameters()))
    # student and teacher agree closely away from eps (the eps-shift only moves c_skip/c_out slightly)
    x = torch.randn(2, 1, 8, 8)
    s2 = CMPrecond.from_edm(teacher)
    torch.testing.assert_close(s2(x, 10.0), teacher(x, 10.0), atol=2e-3, rtol=1e-3)
