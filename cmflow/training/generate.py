"""Drawing images from trained models with per-sample seeds (uint8 out), for grids, datasets and FID.

Sample ``s`` uses ``StackedRandomGenerator`` seed ``s`` for its latent (and its class label and multistep
noise), and batches are always cut at ``seed_start + i * batch_size``: any split of the seed range over
tasks or workers then evaluates the same batches and gives byte-identical images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cmflow.data.images import to_uint8
from cmflow.diffusion.rng import StackedRandomGenerator
from cmflow.diffusion.samplers import cm_sample, edm_sampler

ClassLabels = int | str | None  # None: unconditional; an int: that class; "uniform": drawn per sample


def batch_ranges(seed_start: int, num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """[(first seed, end seed)] of consecutive batches covering ``num_samples`` seeds from ``seed_start``."""
    end = seed_start + num_samples
    return [(s, min(s + batch_size, end)) for s in range(seed_start, end, batch_size)]


def _labels(
    rnd: StackedRandomGenerator, num_classes: int, class_labels: ClassLabels, device: torch.device
) -> torch.Tensor | None:
    if num_classes == 0:
        return None
    if class_labels is None or class_labels == "uniform":
        return rnd.randint(0, num_classes, (len(rnd),)).to(device)
    label = int(class_labels)
    if not 0 <= label < num_classes:
        raise ValueError(f"class label {label} is outside 0..{num_classes - 1}")
    return torch.full((len(rnd),), label, dtype=torch.long, device=device)


@torch.no_grad()
def sample_images(
    model: nn.Module,
    seeds: Sequence[int],
    *,
    shape: tuple[int, int, int],
    method: str,
    num_steps: int = 18,
    sigmas: Sequence[float] = (80.0,),
    num_classes: int = 0,
    class_labels: ClassLabels = None,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray | None]:
    """One batch: uint8 (B, C, H, W) images (and int64 labels when conditional) for ``seeds``.

    ``method="edm"``: the deterministic Heun sampler with ``num_steps`` (NFE 2 num_steps - 1);
    ``method="cm"``: multistep consistency sampling at ``sigmas`` (``len(sigmas)`` NFE).
    """
    device = torch.device(device)
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn((len(seeds), *shape), dtype=torch.float32)  # (B, C, H, W)
    labels = _labels(rnd, num_classes, class_labels, device)
    if method == "edm":
        x = edm_sampler(model, latents, num_steps=num_steps, class_labels=labels)
    elif method == "cm":
        x = cm_sample(model, latents, sigmas, generator=rnd, class_labels=labels)
    else:
        raise ValueError(f"unknown sampling method {method!r}; use 'edm' or 'cm'")
    images = to_uint8(x.clamp(-1, 1)).cpu().numpy()
    return images, (labels.cpu().numpy().astype(np.int64) if labels is not None else None)


def sample_range(
    model: nn.Module,
    seed_start: int,
    num_samples: int,
    batch_size: int,
    **kwargs: object,
) -> tuple[np.ndarray, np.ndarray | None]:
    """All images for seeds [seed_start, seed_start + num_samples), batch by batch (see :func:`sample_images`)."""
    parts = [
        sample_images(model, range(a, b), **kwargs)
        for a, b in batch_ranges(seed_start, num_samples, batch_size)
    ]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]) if parts and parts[0][1] is not None else None
    return images, labels
