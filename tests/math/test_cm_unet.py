"""UNet backbone: shapes per preset, conditioning paths, config round trip."""

import json

import pytest
import torch

from cmflow.models import UNET_PRESETS, UNet, UNetConfig, make_unet


def _perturb(net: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net


def _count(preset: str, res: int, ch: int) -> int:
    with torch.device("meta"):
        net = make_unet(preset, res, ch)
    return sum(p.numel() for p in net.parameters())


def test_presets_exist():
    assert {"tiny", "digits", "cifar10", "imagenet64"} <= set(UNET_PRESETS)


@pytest.mark.parametrize("preset, lo, hi", [("tiny", 10_000, 100_000), ("digits", 500_000, 1_500_000)])
def test_small_presets_forward(preset, lo, hi):
    net = make_unet(preset, 8, 1)
    n = sum(p.numel() for p in net.parameters())
    assert lo <= n <= hi
    x = torch.randn(16, 1, 8, 8)
    out = net(x, torch.randn(16))
    assert out.shape == (16, 1, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer


@pytest.mark.parametrize(
    "res, mult, attn", [(16, (1, 2), (8,)), (32, (1, 2, 2), (16,)), (64, (1, 2, 2, 2), (16, 8))]
)
def test_resolutions_up_to_64(res, mult, attn):
    net = make_unet("tiny", res, 3, channel_mult=mult, attn_resolutions=attn, num_classes=4)
    out = net(torch.randn(2, 3, res, res), torch.randn(2), torch.tensor([0, 3]))
    assert out.shape == (2, 3, res, res)


def test_make_unet_num_classes():
    with torch.device("meta"):
        assert make_unet("imagenet64", 64, 3).config.num_classes == 1000  # preset value kept
        assert make_unet("imagenet64", 64, 3, num_classes=0).config.num_classes == 0
        assert make_unet("digits", 8, 1, num_classes=10, dropout=0.1).config.dropout == 0.1


def test_paper_scale_presets():
    # NCSN++ CIFAR-10 is ~56 M parameters, ADM ImageNet-64 ~296 M (with resblock up/down, which we omit).
    assert 45e6 < _count("cifar10", 32, 3) < 65e6
    assert 240e6 < _count("imagenet64", 64, 3) < 320e6
    with torch.device("meta"):
        inet = make_unet("imagenet64", 64, 3)
    assert inet.config.num_classes == 1000 and inet.config.attn_resolutions == (32, 16, 8)


def test_cifar10_forward_batch1():
    net = make_unet("cifar10", 32, 3).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32), torch.randn(1))
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
def test_noise_embedding_types(embedding_type):
    net = _perturb(make_unet("tiny", 8, 1, embedding_type=embedding_type, attn_resolutions=(8, 4)))
    x = torch.randn(2, 1, 8, 8)
    a = net(x, torch.full((2,), -1.0))
    b = net(x, torch.full((2,), 1.0))
    assert a.shape == x.shape and (a - b).abs().max() > 1e-3  # noise labels matter


def test_class_conditional_path():
    net = _perturb(make_unet("tiny", 8, 1, num_classes=10))
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    a = net(x, c, torch.tensor([0, 0]))
    b = net(x, c, torch.tensor([3, 3]))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c)
    # unconditional nets ignore labels (as EDM's preconditioners do)
    unc = _perturb(make_unet("tiny", 8, 1))
    assert torch.equal(unc(x, c), unc(x, c, torch.tensor([1, 2])))


def test_batch_independence():
    net = _perturb(make_unet("tiny", 8, 1, attn_resolutions=(8,))).eval()
    x, c = torch.randn(6, 1, 8, 8), torch.randn(6)
    full = net(x, c)
    torch.testing.assert_close(torch.cat([net(x[:2], c[:2]), net(x[2:], c[2:])]), full, rtol=0, atol=1e-6)


def test_dropout_train_vs_eval():
    net = _perturb(make_unet("tiny", 8, 1, dropout=0.5))
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    assert not torch.equal(net(x, c), net(x, c))
    net.eval()
    assert torch.equal(net(x, c), net(x, c))


def test_config_json_round_trip_and_state_dict():
    cfg = UNetConfig(
        img_resolution=8,
        in_channels=3,
        out_channels=3,
        channel_mult=(1, 2),
        attn_resolutions=(4,),
        embedding_type="fourier",
        model_channels=16,
        num_classes=5,
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["channel_mult"] == [1, 2]
    cfg2 = UNetConfig.from_dict(d)
    assert cfg2 == cfg and isinstance(cfg2.channel_mult, tuple)
    net = _perturb(UNet(cfg))
    net2 = UNet(cfg2)
    net2.load_state_dict(net.state_dict())  # the Fourier frequencies travel as a buffer
    x, c, y = torch.randn(2, 3, 8, 8), torch.randn(2), torch.tensor([1, 4])
    assert torch.equal(net(x, c, y), net2(x, c, y))
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({**d, "bogus": 1})


def test_config_validation():
    with pytest.raises(ValueError):
        UNetConfig(img_resolution=6, in_channels=1, out_channels=1, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError):
        make_unet("nope", 8, 1)
