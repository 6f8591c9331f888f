"""FID Inception-v3: pytorch-fid state-dict layout, weights loading (safe), TF1 resize, 2048-d features.

No real weights exist offline, so the tests write random weights in the expected layout themselves.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmflow.metrics.extractors import InceptionExtractor, load_extractor
from cmflow.metrics.inception import (
    FID_WEIGHTS_FILENAME,
    FIDInceptionV3,
    build_fid_inception,
    load_inception_weights,
    resize_bilinear_tf1,
)


def randomize_(model: FIDInceptionV3, seed: int) -> FIDInceptionV3:
    """Random weights with O(1) activations (default init makes pool3 ~1e-8) and non-trivial BN buffers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(1 + 0.1 * torch.randn(c, generator=gen))
                module.bias.copy_(0.1 * torch.randn(c, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(0.01 * torch.randn(module.weight.shape, generator=gen))
                module.bias.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    return randomize_(build_fid_inception(), seed=0)


@pytest.fixture(scope="module")
def weights_file(model: FIDInceptionV3, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / FID_WEIGHTS_FILENAME
    torch.save(model.state_dict(), path)  # a plain state dict, like pytorch-fid's release file
    return path


def images(b: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, channels, size, size), generator=gen, dtype=torch.uint8)


# -- layout --------------------------------------------------------------------------------------------------


def test_state_dict_layout_matches_pytorch_fid_file() -> None:
    sd = build_fid_inception().state_dict()
    # torchvision Inception3(num_classes=1008, aux_logits=False): 94 BasicConv2d x (conv.weight + 5 BN
    # entries incl. num_batches_tracked) + fc.weight + fc.bias
    assert len(sd) == 94 * 6 + 2
    for key in (
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_1a_3x3.bn.running_var",
        "Conv2d_4a_3x3.bn.num_batches_tracked",
        "Mixed_5b.branch1x1.conv.weight",
        "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6a.branch3x3dbl_3.bn.bias",
        "Mixed_6e.branch7x7dbl_5.conv.weight",
        "Mixed_7a.branch7x7x3_4.conv.weight",
        "Mixed_7b.branch3x3dbl_3b.conv.weight",
        "Mixed_7c.branch_pool.conv.weight",
    ):
        assert key in sd, key
    assert sd["fc.weight"].shape == (1008, 2048) and sd["fc.bias"].shape == (1008,)
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert not any(".conv.bias" in k for k in sd)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    bns = [m for m in build_fid_inception().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 1e-3 for m in bns)


# -- features and loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_2048_features_and_loaded_model_equals_in_memory_model(
    model: FIDInceptionV3, weights_file: Path, size: int
) -> None:
    x = images(2, size)
    ext = load_extractor("inception-v3", weights=str(weights_file))
    assert isinstance(ext, InceptionExtractor) and ext.num_features == 2048
    got = ext(x)
    with torch.inference_mode():
        expected = model(x.float())
    assert got.shape == (2, 2048) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert got.std() > 1e-3  # not degenerate
    assert not torch.allclose(got[0], got[1])


def test_weights_load_from_bytes_and_file_uri(model: FIDInceptionV3, weights_file: Path) -> None:
    data = weights_file.read_bytes()
    x = images(1, 32, seed=1)
    from_bytes = load_extractor("inception-v3", weights=data)
    from_uri = load_extractor("inception-v3", weights=f"file://{weights_file}")
    assert torch.equal(from_bytes(x), from_uri(x))
    assert from_bytes.weights_sha256 == from_uri.weights_sha256
    assert not from_bytes.is_standard_fid_weights  # random weights do not carry the 6726825d hash


def test_grey_input_is_replicated_to_rgb(weights_file: Path) -> None:
    ext = load_extractor("inception-v3", weights=weights_file)
    grey = images(2, 32, channels=1, seed=2)
    assert torch.equal(ext(grey), ext(grey.expand(-1, 3, -1, -1).contiguous()))


def test_strict_loading_rejects_missing_and_extra_keys(model: FIDInceptionV3, tmp_path: Path) -> None:
    sd = dict(model.state_dict())
    missing = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_inception_weights(build_fid_inception(), tmp_path / "missing.pth")
    torch.save({**sd, "AuxLogits.fc.weight": torch.zeros(1008, 768)}, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_inception_weights(build_fid_inception(), tmp_path / "extra.pth")


def test_missing_weights_say_which_file_to_pass() -> None:
    with pytest.raises(ValueError) as info:
        load_extractor("inception-v3")
    assert FID_WEIGHTS_FILENAME in str(info.value) and "fid.weights_uri" in str(info.value)
    with pytest.raises(ValueError, match="remote URI"):
        load_extractor("inception-v3", weights="s3://bucket/" + FID_WEIGHTS_FILENAME)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        load_extractor("inception-v4")


class _Exploit:
    """Unpickling this calls open(marker, "w"), i.e. runs code and creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_that_runs_code_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"Conv2d_1a_3x3.conv.weight": _Exploit(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        load_inception_weights(build_fid_inception(), path)
    assert not marker.exists()


def test_safetensors_weights_load_too(model: FIDInceptionV3, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.fspath(path))
    ext = load_extractor("inception-v3", weights=path)
    x = images(1, 32, seed=3)
    with torch.inference_mode():
        assert torch.equal(ext(x), model(x.float()))


# -- preprocessing -------------------------------------------------------------------------------------------


def _tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Loop transcription of TF1 resize_bilinear(align_corners=False, half_pixel_centers=False), (H, W)."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w), dtype=np.float64)
    for i in range(out_h):
        y = i * (in_h / out_h)
        y0 = int(np.floor(y))
        y1, dy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = j * (in_w / out_w)
            x0 = int(np.floor(x))
            x1, dx = min(x0 + 1, in_w - 1), x - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


def test_resize_follows_tf1_legacy_semantics() -> None:
    # 2 -> 4 in TF1 legacy mode samples at 0, 0.5, 1, 1.5 (no half-pixel centres, right edge replicated)
    x = torch.tensor([[[[0.0, 10.0]]]])
    out = resize_bilinear_tf1(x, (1, 4))
    assert out.flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    # torch's align_corners=False uses half-pixel centres, which differs
    assert not torch.allclose(out, F.interpolate(x, size=(1, 4), mode="bilinear", align_corners=False))

    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (5, 7))
    got = resize_bilinear_tf1(torch.from_numpy(img).float()[None, None], (12, 9))[0, 0].double().numpy()
    np.testing.assert_allclose(got, _tf1_resize_reference(img, 12, 9), rtol=0, atol=1e-3)
    same = torch.from_numpy(img).float()[None, None]
    assert torch.equal(resize_bilinear_tf1(same, (5, 7)), same)


def test_preprocess_resizes_to_299_and_normalises_like_the_tf_graph() -> None:
    x = torch.tensor([0.0, 128.0, 255.0]).view(1, 1, 1, 3).expand(2, 3, 32, 3).contiguous()
    out = FIDInceptionV3.preprocess(x)
    assert out.shape == (2, 3, 299, 299)
    assert out.min().item() == -1.0 and out.max().item() == pytest.approx(127 / 128)
    assert FIDInceptionV3.preprocess(torch.full((1, 3, 299, 299), 128.0)).abs().max() == 0
