"""CD, CT and iCT train a small network to the closed-form consistency function of Gaussian data.

Data x0 ~ N(0, S^2 I) with S = sigma_data = 0.5 on a (B, 1, 2, 2) "image". The PF-ODE solution is linear,
x(sigma) = x(sigma0) sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma0^2), so the consistency function is
f*(x, sigma) = g*(sigma) x with g*(sigma) = sqrt(S^2 + eps^2) / sqrt(S^2 + sigma^2).

The backbone is a small MLP of c_noise that outputs a per-sample gain, F(x_in, c_noise) = a(c_noise) x_in; inside
CMPrecond this family contains f* exactly, so any remaining error is the loss's fixed point plus optimisation
error. We measure the learned gain g(sigma) = f(1, sigma) on a Karras grid and compare it with g*:

* CD (N = 40, one Heun teacher step with the analytic denoiser, mu = 0, l2, lambda = 1/dt): the N = 40 Heun
  discretisation error of g* is 1.0 %; tolerance: max relative error 3 % (measured 1.05-1.5 % over 5 seeds);
  against the discrete Heun fixed point (a closed-form product of Heun step gains) 2 %.
* CT (curriculum N(k), s0 = 2, s1 = 150, mu = 0, l2, lambda = 1/dt): the l2 CT fixed point at N = 151 is 1.9 %
  from g*; tolerance: max 6 %, mean 3 % (measured max 2.4-3.4 %, mean 1.3-1.9 % over 5 seeds).
* iCT (pseudo-Huber, lognormal indices, lambda = 1/dt, N(k) from 11 to 161): tolerance max 4 %, mean 2.5 %
  (measured max 1.3-2.0 %, mean 0.7-1.2 % over 5 seeds).

lambda = 1/dt (iCT's weighting, also offered for CD/CT) matters here: with lambda = 1 the small-sigma end,
where c_out is small and gradients are weak, converges much more slowly (errors of 4-9 % after the same steps).
"""

import math

import torch
from torch import nn

from cmflow.diffusion import CDLoss, CTLoss, ICTLoss, ct_num_steps, heun_step, ict_num_steps, karras_sigmas
from cmflow.models import CMPrecond

S, EPS = 0.5, 0.002


def gaussian_denoiser(x, sigma, class_labels=None):
    return x * S**2 / (S**2 + sigma**2)


class GainMLP(nn.Module):
    """F(x_in, c_noise) = a(c_noise) x_in with a 2-hidden-layer MLP a."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x, noise_labels, class_labels=None):
        return self.net(noise_labels.reshape(-1, 1).to(x.dtype)).reshape(-1, 1, 1, 1) * x


def exact_gain(sigmas):
    return math.sqrt(S**2 + EPS**2) / (S**2 + sigmas**2).sqrt()


def learned_gain(model, sigmas):
    with torch.no_grad():
        return model(torch.ones(len(sigmas), 1, 1, 1), sigmas.float())[:, 0, 0, 0].double()


def train(step_loss, steps: int, batch: int, lr: float = 1e-2, seed: int = 0) -> CMPrecond:
    torch.manual_seed(seed)
    student = CMPrecond(GainMLP())
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed + 1)
    for k in range(steps):
        images = torch.randn(batch, 1, 2, 2, generator=gen) * S
        loss = step_loss(student, images, k, gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student


def test_cd_converges_to_closed_form():
    n = 40
    loss_fn = CDLoss(num_scales=n, distance="l2", weighting="inverse_dt")
    student = train(
        lambda f, x, k, g: loss_fn(f, f, gaussian_denoiser, x, generator=g), steps=2000, batch=256
    )
    sigmas = karras_sigmas(n)
    gain = learned_gain(student, sigmas)
    err = ((gain - exact_gain(sigmas)) / exact_gain(sigmas)).abs()
    one = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    discrete = torch.tensor([1.0] + [float(heun_step(gaussian_denoiser, one, float(sigmas[i + 1]), float(sigmas[i])))
                                     for i in range(n - 1)]).cumprod(0)  # fmt: skip
    err_discrete = ((gain - discrete) / discrete).abs()
    print(
        f"CD: max rel. error vs f* {float(err.max()):.4f}, vs Heun fixed point {float(err_discrete.max()):.4f}"
    )
    assert float(err.max()) < 0.03
    assert float(err_discrete.max()) < 0.02


def test_ct_converges_to_closed_form():
    steps, s1 = 2000, 150
    loss_fn = CTLoss(distance="l2", weighting="inverse_dt")
    student = train(
        lambda f, x, k, g: loss_fn(f, f, x, num_scales=ct_num_steps(k, steps, 2, s1), generator=g),
        steps=steps,
        batch=512,
    )
    sigmas = karras_sigmas(200)
    err = ((learned_gain(student, sigmas) - exact_gain(sigmas)) / exact_gain(sigmas)).abs()
    print(f"CT: max rel. error vs f* {float(err.max()):.4f}, mean {float(err.mean()):.4f}")
    assert float(err.max()) < 0.06 and float(err.mean()) < 0.03


def test_ict_converges_to_closed_form():
    steps = 2000
    loss_fn = ICTLoss()
    student = train(
        lambda f, x, k, g: loss_fn(f, x, num_scales=ict_num_steps(k, steps, 10, 160), generator=g),
        steps=steps,
        batch=512,
    )
    sigmas = karras_sigmas(200)
    err = ((learned_gain(student, sigmas) - exact_gain(sigmas)) / exact_gain(sigmas)).abs()
    print(f"iCT: max rel. error vs f* {float(err.max()):.4f}, mean {float(err.mean()):.4f}")
    assert float(err.max()) < 0.04 and float(err.mean()) < 0.025
