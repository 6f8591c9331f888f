"""Training loops in plain torch: the EDM teacher, consistency distillation (CD), CT and iCT.

No Ray, MLflow or fsspec here: the stages (and :mod:`cmflow.distributed.train`) wrap these functions
with checkpoint storage, progress display and Ray Train workers.

Structure (EDM ``training_loop.py`` in small pieces):

* :class:`TrainState` -- the online network, its evaluation EMA, the CD/CT target theta-, the optimizer,
  the step and the metric rows; everything a checkpoint holds (:mod:`cmflow.training.checkpoint`).
* :class:`Batch` / :class:`BatchSource` -- a rank's part of each global minibatch, in the sample order of
  :mod:`cmflow.training.order` (every epoch visits the whole dataset, seeded, resumable), with one RNG per
  sample seeded by its step and position in the global batch: a run resumed at step ``k`` draws exactly
  what the uninterrupted run would have, and W workers x batch B/W draw what 1 worker x batch B draws.
  :class:`ArrayBatches` serves an in-memory array; Ray Train workers stream theirs from the shards.
* ``*_step`` builders -- one optimisation step of each method (loss, backward, optimizer, EMA updates).
* :func:`run_loop` -- steps, logging (loss, img/s), checkpoints and an optional time budget.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from cmflow.diffusion.ema import ema_update, ema_warmup_rate
from cmflow.diffusion.losses import CDLoss, CTLoss, EDMLoss, ICTLoss
from cmflow.diffusion.noise_levels import ct_ema_rate, ct_num_steps, ict_num_steps
from cmflow.diffusion.rng import StackedRandomGenerator
from cmflow.training.order import SampleOrder, sample_seed

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


@dataclass(frozen=True)
class Batch:
    """One rank's part of a global minibatch: images in [-1, 1], labels, and one RNG per sample."""

    x: Tensor  # (b, C, H, W) float32 on the training device
    labels: Tensor | None  # (b,) int64, or None
    generator: StackedRandomGenerator  # per-sample CPU generators (noise, noise levels, indices)


class BatchSource(Protocol):
    """``batch(step)`` -> this rank's part of global batch ``step`` (:class:`ArrayBatches`, or the streamed
    :class:`cmflow.distributed.data.StreamBatches`)."""

    def batch(self, step: int) -> Batch: ...


def batch_from_rows(
    images: np.ndarray,
    labels: np.ndarray | None,
    seeds: list[int],
    device: torch.device,
) -> Batch:
    """uint8 (b, C, H, W) rows -> a :class:`Batch` on ``device`` with one generator per sample seed."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).to(torch.float32) / 127.5 - 1
    y = torch.from_numpy(np.ascontiguousarray(labels)).to(device) if labels is not None else None
    return Batch(x, y, StackedRandomGenerator("cpu", seeds))


class ArrayBatches:
    """Batches of an in-memory uint8 (N, C, H, W) dataset in the order of a :class:`SampleOrder`.

    Rank ``rank`` of ``world`` gets the rows of its lanes (:meth:`SampleOrder.rank_lanes`) of every global
    batch, and each sample's generator is seeded by :func:`~cmflow.training.order.sample_seed` of its
    position in the global batch -- what the streamed source gives a Ray Train worker, without the store.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        batch_size: int,
        *,
        seed: int,
        order: SampleOrder | None = None,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels
        self.order = order or SampleOrder((images.shape[0],), seed, world, images.shape[0])
        self.batch_size, self.seed = batch_size, seed
        self.lanes = self.order.rank_lanes(rank, world)
        self.device = torch.device(device)

    def batch(self, step: int) -> Batch:
        b = self.order.lane_batch(self.batch_size)
        rows = self.order.step_rows(step, self.batch_size, self.lanes)
        positions = [lane * b + j for lane in self.lanes for j in range(b)]
        seeds = [sample_seed(self.seed, step, g) for g in positions]
        labels = self.labels[rows] if self.labels is not None else None
        return batch_from_rows(self.images[rows], labels, seeds, self.device)


def _optimise(state: TrainState, cfg: OptimConfig, step: int, loss: Tensor) -> float:
    set_lr(state.optimizer, cfg, step)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    return float(loss.detach())


def teacher_step(
    loss_fn: EDMLoss, data: BatchSource, cfg: OptimConfig, ema_rate: float, forward: nn.Module | None = None
) -> StepFn:
    """One EDM step: denoising loss, optimizer, evaluation EMA with warm-up min(rate, (1 + k) / (10 + k))."""

    def step(state: TrainState, k: int) -> float:
        batch = data.batch(k)
        x, labels, generator = batch.x, batch.labels, batch.generator
        loss = loss_fn(forward or state.online, x, class_labels=labels, generator=generator).mean()
        value = _optimise(state, cfg, k, loss)
        ema_update(state.ema, state.online, ema_warmup_rate(k, ema_rate))
        return value

    return step


def cd_step(
    loss_fn: CDLoss,
    teacher: nn.Module,
    data: BatchSource,
    cfg: OptimConfig,
    *,
    mu: float,
    ema_rate: float,
    forward: nn.Module | None = None,
) -> StepFn:
    """One CD step (CM Alg. 2): loss against the target theta-, then theta- <- mu theta- + (1 - mu) theta."""

    def step(state: TrainState, k: int) -> float:
        assert state.target is not None
        batch = data.batch(k)
        x, labels, generator = batch.x, batch.labels, batch.generator
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
    data: BatchSource,
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
        batch = data.batch(k)
        x, labels, generator = batch.x, batch.labels, batch.generator
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
    data: BatchSource,
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
        batch = data.batch(k)
        x, labels, generator = batch.x, batch.labels, batch.generator
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
