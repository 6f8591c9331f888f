"""Images from a model with per-sample seeds: the one sampling path of cmflow.

``teacher_sample``, ``evaluate``, the training stages' grids, ``cmflow sample`` and the served model all
draw through :func:`sample_images`, so one seed gives the same image everywhere. Sample ``s`` owns a
generator seeded with ``s`` (EDM's ``StackedRandomGenerator``) **on the CPU**, from which it draws, in this
order: its latent z ~ N(0, I), its class label (when labels are drawn), then the fresh noise of every
further step of multistep consistency sampling (CM Algorithm 1). The draws are then moved to the model's
device, so images do not depend on the batch split, the number of tasks or workers, or the device's RNG.

Images leave as uint8 exactly as a saved PNG holds them: ``round((x + 1) 127.5)`` clamped to [0, 255]
(:func:`to_uint8`); FID, grids and datasets of teacher samples all see those bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from cmflow.diffusion.rng import StackedRandomGenerator, module_device
from cmflow.diffusion.samplers import cm_sample, edm_sampler

__all__ = ["ClassLabels", "batch_ranges", "from_uint8", "sample_images", "sample_range", "to_uint8"]

#: None: unconditional models get none, conditional ones a label drawn per sample; an int: that class for
#: every sample; a sequence: one label per sample.
ClassLabels = int | Sequence[int] | None
Method = Literal["edm", "cm"]


def to_uint8(x: Tensor) -> Tensor:
    """Floats in [-1, 1] (N, C, H, W) -> uint8 on the same device: ``round((x + 1) 127.5)``, clamped."""
    return ((x.to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: np.ndarray | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1] on ``device`` (x / 127.5 - 1)."""
    return torch.as_tensor(images, device=device).to(torch.float32) / 127.5 - 1


def batch_ranges(seed_start: int, num_samples: int, batch_size: int) -> list[range]:
    """Consecutive seed ranges cut at ``seed_start + i * batch_size``: the same cuts for any split of the work."""
    end = seed_start + num_samples
    return [range(s, min(s + batch_size, end)) for s in range(seed_start, end, batch_size)]


def _labels(rnd: StackedRandomGenerator, num_classes: int, class_labels: ClassLabels) -> Tensor | None:
    if num_classes == 0:
        if class_labels is not None:
            raise ValueError("the model is unconditional; leave class labels out")
        return None
    if class_labels is None:
        return rnd.randint(0, num_classes, (len(rnd),)).reshape(-1)
    values = (
        [int(class_labels)] * len(rnd) if isinstance(class_labels, int) else [int(v) for v in class_labels]
    )
    if len(values) != len(rnd):
        raise ValueError(f"got {len(values)} class labels for {len(rnd)} samples")
    if any(not 0 <= v < num_classes for v in values):
        raise ValueError(f"class labels must lie in 0..{num_classes - 1}, got {sorted(set(values))}")
    return torch.tensor(values, dtype=torch.long)


@torch.inference_mode()
def sample_images(
    model: nn.Module,
    seeds: Sequence[int],
    *,
    shape: tuple[int, int, int],
    method: Method,
    num_steps: int = 18,
    sigmas: Sequence[float] = (80.0,),
    num_classes: int = 0,
    class_labels: ClassLabels = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor | None]:
    """One batch: uint8 (B, C, H, W) CPU images and, for conditional models, their int64 labels.

    ``method="edm"``: the deterministic Heun sampler with ``num_steps`` steps (NFE 2 num_steps - 1) integrated
    in ``dtype`` (float64 as in EDM); ``method="cm"``: multistep consistency sampling at ``sigmas``
    (``len(sigmas)`` NFE). The model runs on its own device; sigma limits are the model's.
    """
    device = module_device(model)
    rnd = StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn((len(rnd), *shape), dtype=torch.float32).to(device)  # (B, C, H, W)
    labels = _labels(rnd, num_classes, class_labels)
    on_device = labels.to(device) if labels is not None else None
    sigma_min = float(getattr(model, "sigma_min", 0.002))
    sigma_max = float(getattr(model, "sigma_max", 80.0))
    if method == "edm":
        x = edm_sampler(
            model,
            latents,
            num_steps=num_steps,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            class_labels=on_device,
            dtype=dtype,
        )
    elif method == "cm":
        x = cm_sample(model, latents, sigmas, generator=rnd, sigma_min=sigma_min, class_labels=on_device)
    else:
        raise ValueError(f"unknown sampling method {method!r}; use 'edm' or 'cm'")
    return to_uint8(x.clamp(-1, 1)).cpu(), labels


def sample_range(
    model: nn.Module, seed_start: int, num_samples: int, batch_size: int, **kwargs: object
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images (and labels) for seeds [seed_start, seed_start + num_samples), batch by batch."""
    parts = [
        sample_images(model, seeds, **kwargs) for seeds in batch_ranges(seed_start, num_samples, batch_size)
    ]  # type: ignore[arg-type]
    images = np.concatenate([p[0].numpy() for p in parts])
    labels = np.concatenate([p[1].numpy() for p in parts]) if parts and parts[0][1] is not None else None
    return images, labels
