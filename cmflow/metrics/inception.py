"""TF-2015-12-05-compatible Inception-v3 pool3 network for FID, in plain torch (no torchvision).

Architecture: the "FID Inception" of pytorch-fid (torchvision's Inception-v3 with ``num_classes=1008``, no aux
head, and the four TF-compatibility patches: average pools that ignore padding in the A/C/E_1 blocks and a max
pool in the last E block). Module and parameter names follow torchvision, so the standard FID weights file
``pt_inception-2015-12-05-6726825d.pth`` (a plain state dict: ``Conv2d_1a_3x3.conv.weight``, ...,
``Mixed_7c.branch_pool.bn.running_var``, ``fc.weight`` (1008, 2048), ``fc.bias``; 566 entries) loads with
``strict=True``. The ``fc`` layer is kept only so that file loads strictly (and for :meth:`logits`);
the FID features are the 2048-d global average pool (TF ``pool_3``).

Input handling follows the TF graph (``classify_image_graph_def.pb``) rather than pytorch-fid:

* resize to 299x299 with TF1 ``tf.image.resize_bilinear(align_corners=False)`` semantics, i.e. *legacy* TF
  (no half-pixel centres): source coordinate = dst_index * (in_size / out_size), neighbours floor and
  min(floor + 1, in_size - 1), interpolating along x first, then y, in float32. This is what the graph did to
  every image in TTUR and the OpenAI evaluator, and what clean-fid ``legacy_tensorflow`` and torch-fidelity
  (``interpolate_bilinear_2d_like_tensorflow1x``) reproduce. ``torch.nn.functional.interpolate(...,
  align_corners=False)`` uses half-pixel centres instead (pytorch-fid); for 32 -> 299 that shifts the image by
  ~0.45 px and changes FID by a fraction of a point, so it is *not* used;
* then normalise as the graph does, ``(x - 128) / 128`` (range [-1, 127/128]), not pytorch-fid's
  ``2 * x / 255 - 1``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_SHA256_PREFIX",
    "FIDInceptionV3",
    "build_fid_inception",
    "load_inception_weights",
    "read_state_dict",
    "read_weights_bytes",
    "resize_bilinear_tf1",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
#: torch.hub convention: the hex in the file name is the start of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299


# -- resizing ------------------------------------------------------------------------------------------------


def _tf1_axis(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Legacy TF1 bilinear sampling positions along one axis: (lo index, hi index, fractional weight)."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = torch.floor(src)
    frac = (src - lo).to(device)
    lo_idx = lo.long().clamp_max(in_size - 1)
    hi_idx = (lo_idx + 1).clamp_max(in_size - 1)
    return lo_idx.to(device), hi_idx.to(device), frac


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with TF1 ``resize_bilinear(align_corners=False, half_pixel_centers=False)`` semantics.

    Args:
        x: float tensor (B, C, H, W).
        size: output (height, width).
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    out_h, out_w = size
    y_lo, y_hi, y_frac = _tf1_axis(x.shape[2], out_h, x.device)
    x_lo, x_hi, x_frac = _tf1_axis(x.shape[3], out_w, x.device)
    x_frac, y_frac = x_frac.to(x.dtype), y_frac.to(x.dtype)
    top, bottom = x.index_select(2, y_lo), x.index_select(2, y_hi)  # (B, C, out_h, W)
    top_l, top_r = top.index_select(3, x_lo), top.index_select(3, x_hi)
    bot_l, bot_r = bottom.index_select(3, x_lo), bottom.index_select(3, x_hi)
    top = top_l + (top_r - top_l) * x_frac
    bottom = bot_l + (bot_r - bot_l) * x_frac
    return top + (bottom - top) * y_frac[:, None]


# -- blocks (torchvision names, TF patches) ------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3/1 average pool that, like TF, does not count the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """InceptionE; ``pool="avg"`` for Mixed_7b (E_1), ``pool="max"`` for Mixed_7c (E_2, as in TF)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


# -- network -------------------------------------------------------------------------------------------------


class FIDInceptionV3(nn.Module):
    """Inception-v3 (TF 2015-12-05 variant) returning 2048-d pool3 features.

    ``forward`` takes float images (B, 3, H, W) with values in [0, 255] (any size), resizes them to 299x299
    the legacy-TF way and normalises them like the TF graph. Use :meth:`features_from_normalized` to feed
    already-prepared 299x299 tensors in [-1, 1].
    """

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # present in the weights file; unused for FID features

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """Float (B, 3, H, W) in [0, 255] -> (B, 3, 299, 299) in [-1, 1), as the TF graph does."""
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128.0) / 128.0

    def features_from_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 299, 299) normalised input -> (B, 2048) pool3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_from_normalized(self.preprocess(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """1008-way logits (for Inception Score); not used by FID."""
        return self.fc(self(images))


def build_fid_inception() -> FIDInceptionV3:
    """A randomly initialised :class:`FIDInceptionV3` in eval mode (load weights with
    :func:`load_inception_weights`)."""
    return FIDInceptionV3().eval()


# -- weights -------------------------------------------------------------------------------------------------


def read_weights_bytes(path_or_bytes: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bytes:
    """Bytes as given, or the contents of a local path (``file://`` URIs accepted; other URIs refused)."""
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return bytes(path_or_bytes)
    text = os.fspath(path_or_bytes)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise ValueError(
            f"{text!r} is a remote URI; fetch it with the storage layer and pass bytes or a path"
        )
    return Path(text).read_bytes()


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def read_state_dict(
    path_or_bytes: bytes | bytearray | memoryview | str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], str]:
    """Read a state dict from a ``.pth`` (torch.save of a plain dict) or ``.safetensors`` file or bytes.

    ``.pth`` files are read with ``torch.load(weights_only=True)``: only tensors and plain containers are
    accepted; a pickle that references any other callable (code execution) is refused with an
    ``UnpicklingError``. Returns ``(state_dict, sha256 hex of the bytes)``.
    """
    data = read_weights_bytes(path_or_bytes)
    sha = hashlib.sha256(data).hexdigest()
    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data), sha
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("weights file is not a flat state dict of tensors")
    return dict(obj), sha


def load_inception_weights(
    model: FIDInceptionV3,
    path_or_bytes: bytes | bytearray | memoryview | str | os.PathLike[str],
) -> str:
    """Load a pytorch-fid-layout state dict into ``model`` with ``strict=True``; returns the file's sha256."""
    state_dict, sha = read_state_dict(path_or_bytes)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    return sha
