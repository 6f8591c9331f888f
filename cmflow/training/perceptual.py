"""An LPIPS-style perceptual distance whose network is loaded from a URI (no downloads, no pickles).

d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (phi_l(x) / ||phi_l(x)||_c - phi_l(y) / ||phi_l(y)||_c)^2
(Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), where
``phi_l`` are the activations at the end of each stage of a plain conv/ReLU network and ``w_l`` the
non-negative 1x1 "lin" weights (all ones if the file has none).

A network folder holds ``perceptual.json`` and ``perceptual.safetensors``::

    {"format": 1, "kind": "perceptual", "stages": [[64, 64], [128, 128], [256, 256, 256], ...],
     "in_channels": 3, "pool": "avg" | "max", "mean": [...], "std": [...], "resolution": null | 8}

``stages`` = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]] with ``pool: avg`` is
the VGG16 of LPIPS as ``piq.LPIPS(replace_pooling=True)`` uses it (convert its weights to these names:
``stages.<i>.<j>.weight/bias``, ``lins.<i>.weight``). Inputs are images in [0, 1] (what
:func:`cmflow.diffusion.losses.distance` passes); ``resolution`` (if set) area-resizes them first, so a
network trained at the data's native size is not run at 224 x 224.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmflow.diffusion.rng import call_with_shared_rng

CONFIG = "perceptual.json"
WEIGHTS = "perceptual.safetensors"


class PerceptualDistance(nn.Module):
    """LPIPS-style distance module: ``forward(x, y)`` with images in [0, 1] returns (B,) distances."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        in_ch = int(config.get("in_channels", 3))
        self.pool = nn.AvgPool2d(2) if config.get("pool", "avg") == "avg" else nn.MaxPool2d(2)
        self.stages = nn.ModuleList()
        for widths in config["stages"]:
            layers = nn.ModuleList()
            for width in widths:
                layers.append(nn.Conv2d(in_ch, int(width), 3, padding=1))
                in_ch = int(width)
            self.stages.append(layers)
        self.lins = nn.ModuleList(nn.Conv2d(int(w[-1]), 1, 1, bias=False) for w in config["stages"])
        for lin in self.lins:
            nn.init.ones_(lin.weight)
        mean = torch.tensor(
            config.get("mean", [0.5] * int(config.get("in_channels", 3))), dtype=torch.float32
        )
        std = torch.tensor(config.get("std", [0.5] * int(config.get("in_channels", 3))), dtype=torch.float32)
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1))
        self.register_buffer("std", std.reshape(1, -1, 1, 1))
        self.resolution = config.get("resolution")
        self.requires_grad_(False)

    def features(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] != self.mean.shape[1]:
            x = x[:, : self.mean.shape[1]]  # grey expanded to RGB by the loss: take it back to one channel
        if self.resolution is not None and x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=int(self.resolution), mode="area")
        h = (x - self.mean) / self.std
        taps = []
        for index, layers in enumerate(self.stages):
            if index:
                h = self.pool(h)
            for conv in layers:
                h = F.relu(conv(h))
            taps.append(h)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for fx, fy, lin in zip(self.features(x), self.features(y), self.lins, strict=True):
            nx = fx / (fx.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((nx - ny).square()).mean(dim=(1, 2, 3))
        return total


def load_perceptual(weights: bytes, config: dict[str, Any]) -> PerceptualDistance:
    """Build the module from its config and load its safetensors weights (strict, lins optional)."""
    from safetensors.torch import load as st_load

    if config.get("format") != 1 or config.get("kind") != "perceptual":
        raise ValueError("not a perceptual-distance config (format 1, kind 'perceptual')")
    module = PerceptualDistance(config)
    state = st_load(weights)
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("lins.", "mean", "std"))]
    if missing or unexpected:
        raise ValueError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return module.eval()


# --------------------------------------------------------------------------------------------------
# A small perceptual network for low-resolution datasets (digits), trained here as a classifier


def small_config(in_channels: int, resolution: int, widths: tuple[int, ...] = (32, 64)) -> dict[str, Any]:
    """Config of a small 2-stage conv/ReLU network evaluated at the data's native ``resolution``."""
    return {
        "format": 1,
        "kind": "perceptual",
        "stages": [[w, w] for w in widths],
        "in_channels": in_channels,
        "pool": "avg",
        "mean": [0.5] * in_channels,
        "std": [0.5] * in_channels,
        "resolution": resolution,
    }


def train_classifier_features(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    widths: tuple[int, ...] = (32, 64),
) -> tuple[PerceptualDistance, float]:
    """Train :class:`PerceptualDistance`'s conv stages as a classifier (global average pool + linear head)
    on uint8 (N, C, H, W) ``images``; returns (the distance module, final training accuracy).

    Random +-1 pixel shifts augment the data. The head is discarded; the lins stay at one (uniform LPIPS).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = PerceptualDistance(small_config(images.shape[1], images.shape[-1], widths)).requires_grad_(True)
    head = nn.Linear(int(widths[-1]), num_classes)
    params = [p for n, p in module.named_parameters() if n.startswith("stages.")] + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    x_all = images.to(torch.float32) / 255.0  # [0, 1], what the distance receives
    correct = 0.0
    for step in range(steps):
        idx = torch.randint(images.shape[0], (batch_size,), generator=generator)
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
        x = torch.roll(x_all[idx], shifts=shift, dims=(2, 3))
        logits = head(module.features(x)[-1].mean(dim=(2, 3)))
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (step + 1) / steps)).item())
    with torch.no_grad():
        logits = head(module.features(x_all)[-1].mean(dim=(2, 3)))
        correct = float((logits.argmax(dim=1) == labels).float().mean())
    return module.requires_grad_(False).eval(), correct


def feature_pair_loss(loss_fn: Any, net: PerceptualDistance) -> Any:
    """Make a CD/CT/iCT loss object use ``net`` as its distance at native resolution (no 224 resize).

    Replaces the loss's ``pair_loss`` (same contract: shared dropout RNG, target under no_grad).
    """

    def pair_loss(student, target, x_hi, t_hi, x_lo, t_lo, class_labels):  # noqa: ANN001, ANN202
        def online() -> Tensor:
            return student(x_hi, t_hi, class_labels=class_labels)

        def offline() -> Tensor:
            with torch.no_grad():
                return target(x_lo, t_lo, class_labels=class_labels)

        out, tgt = call_with_shared_rng(x_hi.device, online, offline)
        return net((out + 1) / 2, (tgt.detach() + 1) / 2)

    loss_fn.pair_loss = pair_loss
    return loss_fn
