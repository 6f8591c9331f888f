"""LPIPS (Zhang et al. 2018) with the published VGG16 weights: the distance the CM paper's best results use.

d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (phi_l(x) / ||phi_l(x)||_c - phi_l(y) / ||phi_l(y)||_c)^2

as the ``lpips`` package (``LPIPS(net="vgg", version="0.1")``) computes it:

* inputs in [-1, 1] pass its scaling layer (x - shift) / scale with shift = (-0.030, -0.088, -0.188) and
  scale = (0.458, 0.448, 0.450), the ImageNet statistics in [-1, 1] units;
* ``phi_l`` are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision's
  ``vgg16().features`` indices 3, 8, 15, 22, 29, max pooling in between);
* each is normalised over channels, x / (sqrt(sum_c x^2) + 1e-10), and the squared difference goes through
  that layer's non-negative 1x1 "lin" convolution (no bias), then a spatial mean.

Weights come as two published files, both plain state dicts read with ``torch.load(weights_only=True)``
(or safetensors): torchvision's VGG16 (``vgg16-397923af.pth``: ``features.N.weight`` / ``features.N.bias``;
its ``classifier.*`` tensors are ignored) and the LPIPS v0.1 heads (the package's ``weights/v0.1/vgg.pth``:
``lin0.model.1.weight`` ... ``lin4.model.1.weight``, shape (1, C, 1, 1)). Loading is strict: every tensor
named above must be there with its shape, and nothing else may be.

:meth:`LPIPS.forward` takes images in [0, 1] (what :func:`cmflow.diffusion.losses.distance` passes; the
package's ``normalize=True``) and returns one distance per image, shape (B,).
"""

from __future__ import annotations

import io

import torch
from torch import Tensor, nn

__all__ = ["LIN_CHANNELS", "LPIPS", "SCALE", "SHIFT", "VGG16_CONVS", "load_lpips", "read_state"]

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16().features: (index, in, out) of each 3x3 convolution; ReLU after each, max pool at 4, 9, 16, 23
VGG16_CONVS = (
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
)  # fmt: skip
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LIN_CHANNELS = (64, 128, 256, 512, 512)


class _Lin(nn.Module):
    """A 1x1 convolution to one channel, no bias (the package's ``NetLinLayer``; dropout is index 0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    convs = {index: (cin, cout) for index, cin, cout in VGG16_CONVS}
    for index in range(TAPS[-1] + 1):
        if index in convs:
            layers.append(nn.Conv2d(*convs[index], 3, padding=1))
        elif index - 1 in convs:
            layers.append(nn.ReLU())
        else:
            layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1 over VGG16; ``forward(x, y)`` with images in [0, 1], (B, 3, H, W) -> (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(_Lin(c) for c in LIN_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def taps(self, x: Tensor) -> list[Tensor]:
        """The five normalised VGG activations of images in [0, 1]."""
        h = ((2 * x - 1) - self.shift) / self.scale  # [0, 1] -> [-1, 1] -> the scaling layer
        out = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in TAPS:
                out.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for fx, fy, lin in zip(self.taps(x), self.taps(y), self.lins, strict=True):
            total = total + lin((fx - fy).square()).mean(dim=(1, 2, 3))
        return total


def read_state(data: bytes) -> dict[str, Tensor]:
    """A state dict from safetensors bytes or a ``torch.save`` file (``weights_only=True``)."""
    if data[8:9] == b"{":
        from safetensors.torch import load as st_load

        return st_load(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError("the file is not a state dict of tensors")
    return dict(state)


def _check(
    state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], what: str, ignore: str = ""
) -> None:
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"the {what} weights lack {key} (shape {shape})")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"the {what} weights' {key} has shape {tuple(state[key].shape)}, not {shape}")
    extra = [k for k in state if k not in expected and not (ignore and k.startswith(ignore))]
    if extra:
        raise ValueError(f"the {what} weights hold {extra[0]}, which is not part of it")


def load_lpips(vgg16: dict[str, Tensor] | bytes, lins: dict[str, Tensor] | bytes) -> LPIPS:
    """:class:`LPIPS` from torchvision's VGG16 state dict and the LPIPS v0.1 VGG heads (strict; eval mode)."""
    vgg_state = read_state(vgg16) if isinstance(vgg16, bytes) else vgg16
    lin_state = read_state(lins) if isinstance(lins, bytes) else lins
    expected_vgg = {}
    for index, cin, cout in VGG16_CONVS:
        expected_vgg[f"features.{index}.weight"] = (cout, cin, 3, 3)
        expected_vgg[f"features.{index}.bias"] = (cout,)
    _check(vgg_state, expected_vgg, "VGG16", ignore="classifier.")
    expected_lin = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LIN_CHANNELS)}
    _check(lin_state, expected_lin, "LPIPS v0.1 lin")
    module = LPIPS()
    module.features.load_state_dict({k.removeprefix("features."): vgg_state[k].float() for k in expected_vgg})
    module.lins.load_state_dict({k.removeprefix("lin"): lin_state[k].float() for k in expected_lin})
    return module.eval()
