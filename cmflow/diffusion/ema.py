"""Exponential moving averages of network weights (the CD/CT target theta- and the evaluation EMA)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ema_rate_from_halflife", "ema_update", "ema_warmup_rate"]


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    """theta- <- rate theta- + (1 - rate) theta for every parameter; buffers are copied (CM Eq. (8), Alg. 2).

    ``rate = 0`` copies the source exactly (CD with mu = 0); ``rate = 1`` leaves the target unchanged.
    Parameter and buffer names must match (``target`` is normally a deep copy of ``source``).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"EMA rate must lie in [0, 1], got {rate}")
    t_params, s_params = dict(target.named_parameters()), dict(source.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("target and source have different parameters")
    for name, p_t in t_params.items():
        p_s = s_params[name].detach()
        if rate == 0.0:
            p_t.copy_(p_s)
        elif rate != 1.0:
            p_t.lerp_(p_s.to(p_t.dtype), 1.0 - rate)
    t_bufs, s_bufs = dict(target.named_buffers()), dict(source.named_buffers())
    for name, b_t in t_bufs.items():
        b_t.copy_(s_bufs[name])


def ema_warmup_rate(step: int, rate: float) -> float:
    """EMA rate with warm-up: min(rate, (1 + step) / (10 + step)) (the usual ramp for the evaluation EMA)."""
    return min(rate, (1 + step) / (10 + step))


def ema_rate_from_halflife(halflife_steps: float) -> float:
    """Per-step rate whose weight halves after ``halflife_steps`` steps: 0.5^(1 / halflife).

    E.g. the openai ImageNet-64 rate 0.9999432189950708 is a 12 207-step half-life (25 M images at batch
    2048).
    """
    return math.exp(math.log(0.5) / halflife_steps)
