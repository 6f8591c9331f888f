"""LPIPS v0.1 over VGG16 from the published weight layouts (cmflow.metrics.lpips).

The lpips and torchvision packages cannot be installed next to the CPU torch, so the checks are a
closed form and the file layouts: with VGG convolutions that copy their input channels (identity 1x1
kernels) every tap is a max-pooled ReLU of the scaled image, and the distance is then computed here by
hand from the LPIPS definition (Zhang et al. 2018, Eq. (1); the package's scaling layer and channel
normalisation). The loader takes exactly torchvision's ``features.N`` keys and the package's
``linK.model.1.weight`` keys.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cmflow.errors import InputError
from cmflow.metrics.lpips import LIN_CHANNELS, SCALE, SHIFT, VGG16_CONVS, load_lpips

TAP_POOLS = (0, 1, 2, 3, 4)  # max pools before relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def _vgg(identity: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, cin, cout in VGG16_CONVS:
        if identity:  # out channel c = in channel c (c < 3), as a 3x3 kernel with only its centre set
            weight = torch.zeros(cout, cin, 3, 3)
            for c in range(min(cin, cout, 3)):
                weight[c, c, 1, 1] = 1.0
            bias = torch.zeros(cout)
        else:
            weight = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
            bias = torch.randn(cout, generator=g) * 0.01
        state[f"features.{index}.weight"], state[f"features.{index}.bias"] = weight, bias
    state["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file has the classifier too: ignored
    return state


def _lins(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(LIN_CHANNELS)}


def _saved(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the published files are torch.save-d state dicts
    return buffer.getvalue()


def test_closed_form_with_channel_copying_convolutions() -> None:
    vgg, lins = _vgg(identity=True), _lins()
    net = load_lpips(_saved(vgg), _saved(lins))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)

    shift = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)  # the package's ScalingLayer
    scale = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)

    def tap(img: torch.Tensor, pools: int, channels: int) -> torch.Tensor:
        h = F.relu(((2 * img - 1) - shift) / scale)  # [0, 1] -> [-1, 1] -> scaled; copied by every conv
        for _ in range(pools):
            h = F.max_pool2d(h, 2)
        h = F.pad(h, (0, 0, 0, 0, 0, channels - 3))  # the other channels are ReLU(0) = 0
        return h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)

    expected = torch.zeros(2)
    for k, (pools, channels) in enumerate(zip(TAP_POOLS, LIN_CHANNELS, strict=True)):
        w = lins[f"lin{k}.model.1.weight"].reshape(1, channels, 1, 1)
        diff = (tap(x, pools, channels) - tap(y, pools, channels)).square()
        expected += (w * diff).sum(dim=1).mean(dim=(1, 2))
    torch.testing.assert_close(net(x, y), expected, rtol=1e-5, atol=1e-7)
    assert SHIFT == (-0.030, -0.088, -0.188) and SCALE == (0.458, 0.448, 0.450)


def test_is_a_distance_on_images() -> None:
    net = load_lpips(_vgg(identity=False), _lins())
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    assert torch.equal(net(x, x), torch.zeros(3))
    torch.testing.assert_close(net(x, y), net(y, x))
    assert (net(x, y) > 0).all()
    closer = (x + 0.02 * (y - x)).clamp(0, 1)
    assert (net(x, closer) < net(x, y)).all()
    # the training distance: grey images are expanded to RGB, resized to 224 below 256 px, mapped to [0, 1]
    from cmflow.diffusion.losses import distance

    a, b = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    d = distance(a, b, "lpips", lpips=net)
    resize = lambda t: (F.interpolate(t.expand(-1, 3, -1, -1), size=224, mode="bilinear") + 1) / 2  # noqa: E731
    torch.testing.assert_close(d, net(resize(a), resize(b)))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda v, h: v.pop("features.28.bias"), r"VGG16 weights lack features\.28\.bias"),
        (
            lambda v, h: v.update({"features.0.weight": torch.zeros(64, 1, 3, 3)}),
            r"features\.0\.weight has shape \(64, 1, 3, 3\)",
        ),
        (
            lambda v, h: v.update({"features.30.weight": torch.zeros(1)}),
            r"hold features\.30\.weight, which is not part of it",
        ),
        (lambda v, h: h.pop("lin4.model.1.weight"), r"lin weights lack lin4\.model\.1\.weight"),
        (
            lambda v, h: h.update({"lin5.model.1.weight": torch.zeros(1, 8, 1, 1)}),
            r"hold lin5\.model\.1\.weight",
        ),
    ],
)
def test_loading_is_strict(change, pattern: str) -> None:  # noqa: ANN001
    vgg, lins = _vgg(identity=True), _lins()
    change(vgg, lins)
    with pytest.raises(ValueError, match=pattern):
        load_lpips(vgg, lins)


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("touch /tmp/cmflow-lpips-pickle-ran",))


def test_weights_by_uri_and_refusals(tmp_path: Path) -> None:
    from cmflow.loaders import load_published_lpips

    vgg, lins = tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth"
    vgg.write_bytes(_saved(_vgg(identity=False)))
    lins.write_bytes(_saved(_lins()))
    net = load_published_lpips(str(vgg), f"file://{lins}", {})
    assert float(net(torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32))) > 0
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_RunsCode(), protocol=2))
    with pytest.raises(InputError, match="was refused: not a weights-only state dict"):
        load_published_lpips(str(vgg), str(evil), {})
    assert not os.path.exists("/tmp/cmflow-lpips-pickle-ran")
    with pytest.raises(InputError, match=r"do not fit \(the LPIPS v0\.1 lin weights lack lin0"):
        load_published_lpips(str(vgg), str(vgg), {})


def test_distill_params_take_both_published_files() -> None:
    from pydantic import ValidationError

    from cmflow.stages.distill import DistillParams

    ok = DistillParams(distance="lpips", lpips_vgg16_uri="s3://m/vgg16.pth", lpips_lin_uri="s3://m/vgg.pth")
    assert ok.lpips_lin_uri == "s3://m/vgg.pth"
    for bad in ({"lpips_vgg16_uri": "a"}, {"lpips_vgg16_uri": "a", "lpips_lin_uri": "b", "distance": "l2"}):
        with pytest.raises(ValidationError, match="go together"):
            DistillParams(**{"distance": "lpips", **bad})
