"""Training loops in plain torch: the EDM teacher, consistency distillation (CD), CT and iCT.

No Ray, MLflow or fsspec here: the stages (and :mod:`cmflow.distributed.train`) wrap these functions
with checkpoint storage, progress display and Ray Train workers.

Structure (EDM ``training_loop.py`` in small pieces):

* :class:`TrainState` -- the online network, its evaluation EMA, the CD/CT target theta-, the optimizer,
  the step and the metric rows; everything a checkpoint holds (:mod:`cmflow.training.checkpoint`).
* :class:`DataSampler` -- minibatches of a uint8 dataset. The RNG of step ``k`` on rank ``r`` is derived
  from ``(seed, r, k)``, so a run resumed at step ``k`` draws exactly what the uninterrupted run would have.
* ``*_step`` builders -- one optimisation step of each method (loss, backward, optimizer, EMA updates).
* :func:`run_loop` -- steps, logging (loss, img/s), checkpoints and an optional time budget.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cmflow.diffusion.ema import ema_update, ema_warmup_rate
from cmflow.diffusion.losses import CDLoss, CTLoss, EDMLoss, ICTLoss
from cmflow.diffusion.noise_levels import ct_ema_rate, ct_num_steps, ict_num_steps

StepFn = Callable[["TrainState", int], float]


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings: Adam or RAdam, linear learning-rate warm-up, no weight decay by default."""

    lr: float
    optimizer: Literal["adam", "radam"] = "adam"
    lr_warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


def make_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int) -> float:
    """lr(step) = lr min(1, (step + 1) / lr_warmup_steps); returns the value set."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class TrainState:
    """What a training run owns; ``online`` is the bare module (never a DDP wrapper)."""

    online: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    target: nn.Module | None = None  # theta- of CD / CT; None for the teacher and iCT (mu = 0)
    step: int = 0
    train_seconds: float = 0.0
    metrics: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off (the EMA and target networks)."""
    return copy.deepcopy(module).requires_grad_(False)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for step ``step`` of rank ``rank`` (splitmix-style mixing, stable across versions)."""
    value = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) % (1 << 64)
    value ^= value >> 31
    value = (value * 0xD6E8FEB86659FD93) % (1 << 64)
    return (value ^ (value >> 32)) % (1 << 63)


class DataSampler:
    """Random minibatches (with replacement) of uint8 (N, C, H, W) images as floats in [-1, 1].

    ``batch(step)`` returns (x, labels or None, generator); the generator, seeded by
    :func:`step_seed`, lives on ``device`` and is meant for the loss's noise draws too.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device) if labels is not None else None
        self.batch_size, self.seed, self.rank = batch_size, seed, rank

    def batch(self, step: int) -> tuple[Tensor, Tensor | None, torch.Generator]:
        generator = torch.Generator(self.device).manual_seed(step_seed(self.seed, self.rank, step))
        idx = torch.randint(self.images.shape[0], (self.batch_size,), generator=generator, device=self.device)
        x = self.images[idx].to(torch.float32) / 127.5 - 1  # (B, C, H, W) in [-1, 1]
        return x, (self.labels[idx] if self.labels is not None else None), generator


def _optimise(state: TrainState, cfg: OptimConfig, step: int, loss: Tensor) -> float:
    set_lr(state.optimizer, cfg, step)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    return float(loss.detach())


def teacher_step(
    loss_fn: EDMLoss, data: DataSampler, cfg: OptimConfig, ema_rate: float, forward: nn.Module | None = None
) -> StepFn:
    """One EDM step: denoising loss, optimizer, evaluation EMA with warm-up min(rate, (1 + k) / (10 + k))."""

    def step(state: TrainState, k: int) -> float:
        x, labels, generator = data.batch(k)
        loss = loss_fn(forward or state.online, x, class_labels=labels, generator=generator).mean()
        value = _optimise(state, cfg, k, loss)
        ema_update(state.ema, state.online, ema_warmup_rate(k, ema_rate))
        return value

    return step


def cd_step(
    loss_fn: CDLoss,
    teacher: nn.Module,
    data: DataSampler,
    cfg: OptimConfig,
    *,
    mu: float,
    ema_rate: float,
    forward: nn.Module | None = None,
) -> StepFn:
    """One CD step (CM Alg. 2): loss against the target theta-, then theta- <- mu theta- + (1 - mu) theta."""

    def step(state: TrainState, k: int) -> float:
        assert state.target is not None
        x, labels, generator = data.batch(k)
        loss = loss_fn(
            forward or state.online, state.target, teacher, x, class_labels=labels, generator=generator
        ).mean()
        value = _optimise(state, cfg, k, loss)
        ema_update(state.target, state.online, mu)
        ema_update(state.ema, state.online, ema_warmup_rate(k, ema_rate))
        return value

    return step


def ct_step(
    loss_fn: CTLoss,
    data: DataSampler,
    cfg: OptimConfig,
    *,
    total_steps: int,
    s0: int,
    s1: int,
    mu0: float,
    ema_rate: float,
    forward: nn.Module | None = None,
) -> StepFn:
    """One CT step (CM Alg. 3) with the N(k) and mu(k) curricula of CM App. C."""

    def step(state: TrainState, k: int) -> float:
        assert state.target is not None
        x, labels, generator = data.batch(k)
        num_scales = ct_num_steps(k, total_steps, s0, s1)
        loss = loss_fn(
            forward or state.online,
            state.target,
            x,
            num_scales=num_scales,
            class_labels=labels,
            generator=generator,
        ).mean()
        value = _optimise(state, cfg, k, loss)
        ema_update(state.target, state.online, ct_ema_rate(k, total_steps, s0, mu0, s1))
        ema_update(state.ema, state.online, ema_warmup_rate(k, ema_rate))
        return value

    return step


def ict_step(
    loss_fn: ICTLoss,
    data: DataSampler,
    cfg: OptimConfig,
    *,
    total_steps: int,
    s0: int,
    s1: int,
    ema_rate: float,
    forward: nn.Module | None = None,
) -> StepFn:
    """One iCT step: target = stop-grad of the online network (mu = 0), exponential N(k) curriculum."""

    def step(state: TrainState, k: int) -> float:
        x, labels, generator = data.batch(k)
        num_scales = ict_num_steps(k, total_steps, s0, s1)
        loss = loss_fn(
            forward or state.online,
            x,
            num_scales=num_scales,
            class_labels=labels,
            generator=generator,
            target=state.online,  # the bare module: the same weights as a DDP-wrapped online network
        ).mean()
        value = _optimise(state, cfg, k, loss)
        ema_update(state.ema, state.online, ema_warmup_rate(k, ema_rate))
        return value

    return step


@dataclass
class LoopHooks:
    """Callbacks of :func:`run_loop`; every one is optional."""

    on_log: Callable[[dict[str, float]], None] | None = None  # a new metrics row
    on_checkpoint: Callable[[TrainState], None] | None = None  # every checkpoint_every steps
    should_stop: Callable[[TrainState], bool] | None = None  # checked after every step (time budget)
    reduce_loss: Callable[[float], float] | None = None  # e.g. the mean over Ray Train workers


def run_loop(
    state: TrainState,
    step_fn: StepFn,
    *,
    total_steps: int,
    images_per_step: int,
    log_every: int = 50,
    checkpoint_every: int = 0,
    hooks: LoopHooks | None = None,
) -> TrainState:
    """Run ``step_fn`` from ``state.step`` to ``total_steps``; returns ``state`` (also updated in place).

    Every ``log_every`` steps a row {step, loss (mean since the last row), imgs_per_s} is appended to
    ``state.metrics`` and passed to ``hooks.on_log``; every ``checkpoint_every`` steps (0: never)
    ``hooks.on_checkpoint(state)`` runs. ``hooks.should_stop`` can end the run early (a time budget).
    """
    hooks = hooks or LoopHooks()
    state.online.train()
    losses: list[float] = []
    window_start, window_steps = time.perf_counter(), 0
    while state.step < total_steps:
        started = time.perf_counter()
        losses.append(step_fn(state, state.step))
        state.step += 1
        window_steps += 1
        state.train_seconds += time.perf_counter() - started
        last = state.step == total_steps
        stop = hooks.should_stop is not None and hooks.should_stop(state)
        if state.step % max(log_every, 1) == 0 or last or stop:
            loss = sum(losses) / len(losses)
            if hooks.reduce_loss is not None:
                loss = hooks.reduce_loss(loss)
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            row = {
                "step": float(state.step),
                "loss": loss,
                "imgs_per_s": window_steps * images_per_step / elapsed,
            }
            state.metrics.append(row)
            if hooks.on_log is not None:
                hooks.on_log(row)
            losses, window_start, window_steps = [], time.perf_counter(), 0
        if hooks.on_checkpoint is not None and checkpoint_every > 0 and state.step % checkpoint_every == 0:
            hooks.on_checkpoint(state)
        if stop:
            break
    return state


def final_loss(state: TrainState) -> float | None:
    """The loss of the last metrics row (None before the first row: meta must stay valid JSON)."""
    return float(state.metrics[-1]["loss"]) if state.metrics else None
