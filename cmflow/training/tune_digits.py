"""Tuning harness for the digits pipeline (how the numbers in docs/digits-tuning.md were measured).

Runs the same loops as the stages (:mod:`cmflow.training.loop`) in one process, without Ray, and scores
models with the FID of :mod:`cmflow.metrics` (the shipped digits feature net, all 1797 real images as the
reference, 5 000 generated samples unless told otherwise)::

    python -m cmflow.training.tune_digits teacher --steps 2600 --out /tmp/t1
    python -m cmflow.training.tune_digits cd --teacher /tmp/t1 --steps 2000 --lr 2e-4 --out /tmp/c1
    python -m cmflow.training.tune_digits fid --model /tmp/c1 --sigmas 80 --sigmas 80,0.8

Prints one JSON line per evaluation. Not used by the pipeline itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmflow.data.sources import read_sklearn_digits
from cmflow.diffusion.ema import ema_update, ema_warmup_rate
from cmflow.diffusion.losses import CDLoss, EDMLoss
from cmflow.models.io import load_model, save_model
from cmflow.models.precond import CMPrecond, EDMPrecond
from cmflow.models.unet import make_unet
from cmflow.training.generate import sample_range
from cmflow.training.loop import (
    DataSampler,
    LoopHooks,
    OptimConfig,
    TrainState,
    cd_step,
    frozen_copy,
    make_optimizer,
    run_loop,
    teacher_step,
)


class Scorer:
    """FID against all 1797 digits with the shipped digits feature network."""

    def __init__(self) -> None:
        from cmflow.metrics.extractors import compute_stats, load_extractor

        self.extractor = load_extractor("digits")
        self._compute = compute_stats
        self.ref = compute_stats(self.extractor, read_sklearn_digits().images).to_moments()

    def fid(self, images: np.ndarray) -> float:
        from cmflow.metrics.stats import fid_from_stats

        return fid_from_stats(*self.ref, *self._compute(self.extractor, images).to_moments())


def _emit(**row: Any) -> None:
    print(json.dumps(row), flush=True)


def _progress(row: dict[str, float]) -> None:
    if int(row["step"]) % 500 == 0:
        _emit(
            kind="progress",
            step=int(row["step"]),
            loss=round(row["loss"], 5),
            imgs_per_s=round(row["imgs_per_s"]),
        )


def _images() -> torch.Tensor:
    return torch.from_numpy(read_sklearn_digits().images)


def teacher(args: argparse.Namespace, scorer: Scorer) -> None:
    net = EDMPrecond(make_unet(args.preset, 8, 1, **json.loads(args.unet)))
    cfg = OptimConfig(lr=args.lr, optimizer=args.optimizer, lr_warmup_steps=args.warmup)
    state = TrainState(net, frozen_copy(net), make_optimizer(net.parameters(), cfg))
    data = DataSampler(_images(), None, args.batch_size, seed=args.seed)
    step = teacher_step(EDMLoss(args.p_mean, args.p_std), data, cfg, args.ema)
    evals = sorted(int(s) for s in args.eval_at.split(",") if s) if args.eval_at else []
    started = time.time()
    for stop in [*evals, args.steps]:
        if stop <= state.step or stop > args.steps:
            continue
        run_loop(
            state,
            step,
            total_steps=stop,
            images_per_step=args.batch_size,
            log_every=100,
            hooks=LoopHooks(on_log=_progress),
        )
        train_s = time.time() - started
        t0 = time.time()
        fid = _fid_edm(state.ema, scorer, args.num_samples, args.num_steps)
        _emit(
            kind="teacher",
            step=state.step,
            train_s=round(train_s, 1),
            loss=state.metrics[-1]["loss"],
            fid_ema=round(fid, 3),
            eval_s=round(time.time() - t0, 1),
        )
        started += time.time() - t0
    if args.raw:
        _emit(
            kind="teacher-raw",
            step=state.step,
            fid_raw=round(_fid_edm(state.online, scorer, args.num_samples, args.num_steps), 3),
        )
    if args.out:
        save_model(state.ema.eval(), args.out, steps=state.step)
        save_model(state.online.eval(), Path(args.out) / "raw")


def _fid_edm(model: torch.nn.Module, scorer: Scorer, num: int, num_steps: int) -> float:
    images, _ = sample_range(
        model.eval(), 10_000_000, num, 500, shape=(1, 8, 8), method="edm", num_steps=num_steps
    )
    model.train()
    return scorer.fid(images)


def _fid_cm(model: torch.nn.Module, scorer: Scorer, num: int, sigmas: list[float]) -> float:
    images, _ = sample_range(model.eval(), 10_000_000, num, 500, shape=(1, 8, 8), method="cm", sigmas=sigmas)
    model.train()
    return scorer.fid(images)


def _load(folder: str) -> torch.nn.Module:
    return load_model(Path(folder) / "model.safetensors", Path(folder) / "model.json")


def cd(args: argparse.Namespace, scorer: Scorer) -> None:
    teacher_net = _load(args.teacher).requires_grad_(False).eval()
    assert isinstance(teacher_net, EDMPrecond)
    student = CMPrecond.from_edm(teacher_net).requires_grad_(True)
    cfg = OptimConfig(lr=args.lr, optimizer=args.optimizer, lr_warmup_steps=args.warmup)
    state = TrainState(
        student, frozen_copy(student), make_optimizer(student.parameters(), cfg), target=frozen_copy(student)
    )
    data = DataSampler(_images(), None, args.batch_size, seed=args.seed)
    if args.distance == "feature":
        from cmflow.training.perceptual import feature_pair_loss, train_classifier_features

        digits = read_sklearn_digits()
        net, accuracy = train_classifier_features(
            torch.from_numpy(digits.images), torch.from_numpy(digits.labels), 10, seed=args.seed + 17
        )
        _emit(kind="feature-net", train_accuracy=round(accuracy, 4))
        loss_fn = feature_pair_loss(CDLoss(args.num_scales), net)
    else:
        loss_fn = CDLoss(args.num_scales, distance=args.distance)
    step = cd_step(loss_fn, teacher_net, data, cfg, mu=args.mu, ema_rate=args.ema)
    if args.anchor_pairs:
        step = _anchored(step, teacher_net, args, loss_fn, data, cfg)
    evals = sorted(int(s) for s in args.eval_at.split(",") if s) if args.eval_at else []
    extra = {float(r): frozen_copy(student) for r in args.extra_emas.split(",") if r}

    def update_extra(s: TrainState) -> bool:  # runs after every step; never stops the loop
        for rate, model in extra.items():
            ema_update(model, s.online, ema_warmup_rate(s.step - 1, rate))
        return False

    started = time.time()
    for stop in [*evals, args.steps]:
        if stop <= state.step or stop > args.steps:
            continue
        run_loop(
            state,
            step,
            total_steps=stop,
            images_per_step=args.batch_size,
            log_every=100,
            hooks=LoopHooks(on_log=_progress, should_stop=update_extra),
        )
        train_s = time.time() - started
        t0 = time.time()
        row = {
            "kind": "cd",
            "step": state.step,
            "train_s": round(train_s, 1),
            "loss": state.metrics[-1]["loss"],
            "fid1_ema": round(_fid_cm(state.ema, scorer, args.num_samples, [80.0]), 3),
            "fid1_raw": round(_fid_cm(state.online, scorer, args.num_samples, [80.0]), 3),
        }
        for rate, model in extra.items():
            row[f"fid1_ema{rate}"] = round(_fid_cm(model, scorer, args.num_samples, [80.0]), 3)
        if stop == args.steps:
            for tau in (float(t) for t in args.taus.split(",")):
                row[f"fid2_ema_{tau}"] = round(_fid_cm(state.ema, scorer, args.num_samples, [80.0, tau]), 3)
        row["eval_s"] = round(time.time() - t0, 1)
        _emit(**row)
        started += time.time() - t0
    if args.out:
        save_model(state.ema.eval(), args.out, steps=state.step)


def _trajectories(teacher_net: torch.nn.Module, num: int, num_steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heun trajectories of the teacher on the descending Karras grid (sigma_max -> sigma_min, all Heun)."""
    from cmflow.diffusion.schedules import karras_sigmas
    from cmflow.diffusion.solvers import heun_step

    sig = karras_sigmas(num_steps).flip(0).to(torch.float32)  # descending, [0] = 80, [-1] = 0.002
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, num, 500):
            b = min(500, num - start)
            x = torch.randn(b, 1, 8, 8, generator=g) * sig[0]
            traj = [x]
            for t, t_next in zip(sig[:-1], sig[1:]):
                x = heun_step(teacher_net, x, float(t), float(t_next))
                traj.append(x)
            out.append(torch.stack(traj))
    return torch.cat(out, dim=1), sig  # (K, M, 1, 8, 8)


def _anchored(step, teacher_net, args, loss_fn, data, cfg):
    t0 = time.time()
    traj, sig = _trajectories(teacher_net, args.anchor_pairs, args.anchor_steps, seed=12345)
    _emit(kind="anchors", pairs=args.anchor_pairs, seconds=round(time.time() - t0, 1))
    K, M = traj.shape[0], traj.shape[1]
    final = traj[-1]

    from cmflow.training.loop import _optimise

    def anchored(state: TrainState, k: int) -> float:
        x_cd, _, generator = data.batch(k)
        loss = loss_fn(state.online, state.target, teacher_net, x_cd, generator=generator).mean()
        g = torch.Generator().manual_seed(k + 999)
        b = args.anchor_batch
        i = torch.randint(M, (b,), generator=g)
        j = torch.randint(K - 1, (b,), generator=g)
        top = torch.rand(b, generator=g) < args.anchor_top
        j = torch.where(top, torch.zeros_like(j), j)
        x, t = traj[j, i], sig[j].reshape(-1, 1, 1, 1)
        loss = loss + args.anchor_weight * (state.online(x, t) - final[i]).square().mean()
        value = _optimise(state, cfg, k, loss)
        ema_update(state.target, state.online, args.mu)
        ema_update(state.ema, state.online, ema_warmup_rate(k, args.ema))
        return value

    return anchored


def ect(args: argparse.Namespace, scorer: Scorer) -> None:
    """Experiment: ECT (Geng et al. 2024) tuning from the teacher, harness-only for now."""
    import math

    from cmflow.training.loop import _optimise

    teacher_net = _load(args.teacher).requires_grad_(False).eval()
    student = CMPrecond.from_edm(teacher_net).requires_grad_(True)
    cfg = OptimConfig(lr=args.lr, optimizer=args.optimizer, lr_warmup_steps=args.warmup)
    state = TrainState(student, frozen_copy(student), make_optimizer(student.parameters(), cfg))
    data = DataSampler(_images(), None, args.batch_size, seed=args.seed)
    eps, c = 0.002, args.huber_c
    double = max(1, args.steps // args.stages)

    def step(st: TrainState, k: int) -> float:
        x, _, g = data.batch(k)
        b = x.shape[0]
        t = (torch.randn(b, generator=g) * args.p_std + args.p_mean).exp().clamp(eps, 80.0)
        stage = k // double
        ratio = 1 - args.q ** (-(stage + 1)) * (1 + 8 * torch.sigmoid(-t))
        r = (t * ratio).clamp(min=eps)
        t = torch.maximum(t, r + 1e-4)
        z = torch.randn(x.shape, generator=g)
        t4, r4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
        out = st.online(x + t4 * z, t4)
        with torch.no_grad():
            tgt = st.online(x + r4 * z, r4)
        d = (out - tgt).reshape(b, -1)
        dist = (d.square().sum(1) + c * c).sqrt() - c
        loss = (dist / (t - r)).mean() if args.ect_weight == "dt" else dist.mean()
        value = _optimise(st, cfg, k, loss)
        ema_update(st.ema, st.online, ema_warmup_rate(k, args.ema))
        return value

    evals = sorted(int(s) for s in args.eval_at.split(",") if s) if args.eval_at else []
    started = time.time()
    for stop in [*evals, args.steps]:
        if stop <= state.step or stop > args.steps:
            continue
        run_loop(state, step, total_steps=stop, images_per_step=args.batch_size, log_every=100,
                 hooks=LoopHooks(on_log=_progress))
        train_s = time.time() - started
        t0 = time.time()
        row = {"kind": "ect", "step": state.step, "train_s": round(train_s, 1), "loss": state.metrics[-1]["loss"],
               "fid1_ema": round(_fid_cm(state.ema, scorer, args.num_samples, [80.0]), 3),
               "fid1_raw": round(_fid_cm(state.online, scorer, args.num_samples, [80.0]), 3)}
        for tau in (float(t) for t in args.taus.split(",")):
            row[f"fid2_ema_{tau}"] = round(_fid_cm(state.ema, scorer, args.num_samples, [80.0, tau]), 3)
        row["eval_s"] = round(time.time() - t0, 1)
        _emit(**row)
        started += time.time() - t0
    if args.out:
        save_model(state.ema.eval(), args.out, steps=state.step)
    del math


def fid(args: argparse.Namespace, scorer: Scorer) -> None:
    model = _load(args.model)
    for spec in args.sigmas or []:
        sigmas = [float(s) for s in spec.split(",")]
        if isinstance(model, EDMPrecond):
            value = _fid_edm(model, scorer, args.num_samples, int(sigmas[0]))
        else:
            value = _fid_cm(model, scorer, args.num_samples, sigmas)
        _emit(kind="fid", model=args.model, sigmas=sigmas, fid=round(value, 3))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["teacher", "cd", "ect", "fid"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--unet", default="{}")
    parser.add_argument("--p-mean", type=float, default=-1.2)  # ect: pass -1.1
    parser.add_argument("--p-std", type=float, default=1.2)
    parser.add_argument("--num-steps", type=int, default=18)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--eval-at", default="")
    parser.add_argument("--raw", action="store_true")
    parser.add_argument("--teacher", default="")
    parser.add_argument("--mu", type=float, default=0.95)
    parser.add_argument("--num-scales", type=int, default=18)
    parser.add_argument("--distance", default="l2")
    parser.add_argument("--extra-emas", default="")
    parser.add_argument("--taus", default="0.4,0.6,0.8,1.2")
    parser.add_argument("--anchor-pairs", type=int, default=0)
    parser.add_argument("--anchor-steps", type=int, default=18)
    parser.add_argument("--anchor-batch", type=int, default=64)
    parser.add_argument("--anchor-weight", type=float, default=1.0)
    parser.add_argument("--anchor-top", type=float, default=0.5)
    parser.add_argument("--q", type=float, default=2.0)
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--huber-c", type=float, default=0.0043)
    parser.add_argument("--ect-weight", default="dt")
    parser.add_argument("--model", default="")
    parser.add_argument("--sigmas", action="append")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    {"teacher": teacher, "cd": cd, "ect": ect, "fid": fid}[args.what](args, Scorer())


if __name__ == "__main__":
    main()
