"""Per-sample generators, dropout-RNG sharing, EMA."""

import copy

import pytest
import torch
from torch import nn

from cmflow.diffusion import (
    StackedRandomGenerator,
    call_with_shared_rng,
    ema_rate_from_halflife,
    ema_update,
    ema_warmup_rate,
    seed_batches,
)
from cmflow.diffusion.rng import rand, randint, randn
from cmflow.models import make_unet


def test_stacked_generator_rows_depend_only_on_their_seed():
    a = StackedRandomGenerator("cpu", [3, 4, 5]).randn([3, 2, 4])
    b = StackedRandomGenerator("cpu", [5, 4]).randn([2, 2, 4])
    assert torch.equal(a[2], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], torch.randn(2, 4, generator=torch.Generator().manual_seed(3)))
    g = StackedRandomGenerator("cpu", [0, 1])
    assert g.randint(0, 10, [2, 5]).shape == (2, 5) and g.rand([2, 3]).shape == (2, 3)
    assert g.randn_like(torch.zeros(2, 3, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError):
        g.randn([3, 1])


def test_generic_draws_accept_all_generator_kinds():
    for gen in (None, torch.Generator().manual_seed(0), StackedRandomGenerator("cpu", [0, 1, 2])):
        assert randn((3, 2), generator=gen).shape == (3, 2)
        assert rand((3,), generator=gen, dtype=torch.float64).dtype == torch.float64
        r = randint(0, 4, (3,), generator=gen)
        assert r.dtype == torch.int64 and int(r.max()) < 4


def test_seed_batches():
    assert seed_batches(range(7), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError):
        seed_batches([1], 0)


def test_shared_rng_gives_identical_dropout_in_a_unet():
    torch.manual_seed(0)
    net = make_unet("tiny", 8, 1, dropout=0.5)
    with torch.no_grad():  # the conv after dropout is zero-initialised; perturb so masks are visible
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    a, b = call_with_shared_rng("cpu", lambda: net(x, c), lambda: net(x, c))
    assert torch.equal(a, b)
    assert not torch.equal(net(x, c), net(x, c))


def test_shared_rng_advances_the_stream_once():
    torch.manual_seed(123)
    call_with_shared_rng("cpu", lambda: torch.rand(5), lambda: torch.rand(5))
    after = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(5)
    assert torch.equal(after, torch.rand(3))  # as if only the online call had run


def test_ema_update():
    src = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    tgt = copy.deepcopy(src)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
        src[1].running_mean.fill_(7.0)
    before = [p.clone() for p in tgt.parameters()]
    ema_update(tgt, src, 0.9)
    for p_t, p0, p_s in zip(tgt.parameters(), before, src.parameters(), strict=True):
        torch.testing.assert_close(p_t, 0.9 * p0 + 0.1 * p_s)
    assert torch.equal(tgt[1].running_mean, src[1].running_mean)  # buffers copied
    ema_update(tgt, src, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(tgt.parameters(), src.parameters(), strict=True))
    snapshot = [p.clone() for p in tgt.parameters()]
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    ema_update(tgt, src, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(tgt.parameters(), snapshot, strict=True))
    with pytest.raises(ValueError):
        ema_update(tgt, src, 1.5)


def test_ema_rates():
    assert ema_warmup_rate(0, 0.9999) == pytest.approx(0.1)
    assert ema_warmup_rate(90, 0.9999) == pytest.approx(0.91)
    assert ema_warmup_rate(10**7, 0.9999) == 0.9999
    assert ema_rate_from_halflife(12_207) == pytest.approx(0.9999432189950708, abs=2e-10)
