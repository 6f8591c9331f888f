"""Tuning harness for the digits pipeline (how the numbers in docs/digits-tuning.md were measured).

Runs the same loops as the stages (:mod:`cmflow.training.loop`) in one process, without Ray, and scores
models with the FID of :mod:`cmflow.metrics` (the shipped digits feature net, all 1797 real images as the
reference, 5 000 generated samples unless told otherwise)::

    python scripts/tune_digits.py teacher --steps 2600 --out /tmp/t1
    python scripts/tune_digits.py cd --teacher /tmp/t1 --steps 2000 --lr 2e-4 --out /tmp/c1
    python scripts/tune_digits.py fid --model /tmp/c1 --sigmas 80 --sigmas 80,0.8

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
from cmflow.diffusion.generate import sample_range
from cmflow.diffusion.losses import CDLoss, EDMLoss
from cmflow.models.io import load_model, save_model
from cmflow.models.precond import CMPrecond, EDMPrecond
from cmflow.models.unet import make_unet
from cmflow.training.loop import (
    ArrayBatches,
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
        self.ref = compute_stats(self.extractor, read_sklearn_digits()[0]).to_moments()

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


def _images() -> np.ndarray:
    return read_sklearn_digits()[0]


def teacher(args: argparse.Namespace, scorer: Scorer) -> None:
    net = EDMPrecond(make_unet(args.preset, 8, 1, **json.loads(args.unet)))
    cfg = OptimConfig(lr=args.lr, optimizer=args.optimizer, lr_warmup_steps=args.warmup)
    state = TrainState(net, frozen_copy(net), make_optimizer(net.parameters(), cfg))
    data = ArrayBatches(_images(), None, args.batch_size, seed=args.seed)
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
    data = ArrayBatches(_images(), None, args.batch_size, seed=args.seed)
    if args.distance == "feature":
        from cmflow.training.perceptual import feature_pair_loss, train_classifier_features

        digit_images, digit_labels = read_sklearn_digits()
        net, accuracy = train_classifier_features(
            torch.from_numpy(digit_images), torch.from_numpy(digit_labels), 10, seed=args.seed + 17
        )
        _emit(kind="feature-net", train_accuracy=round(accuracy, 4))
        loss_fn = feature_pair_loss(CDLoss(args.num_scales), net)
    else:
        loss_fn = CDLoss(args.num_scales, distance=args.distance)
    step = cd_step(loss_fn, teacher_net, data, cfg, mu=args.mu, ema_rate=args.ema)
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
    parser.add_argument("what", choices=["teacher", "cd", "fid"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--unet", default="{}")
    parser.add_argument("--p-mean", type=float, default=-1.2)
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
    parser.add_argument("--model", default="")
    parser.add_argument("--sigmas", action="append")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    {"teacher": teacher, "cd": cd, "fid": fid}[args.what](args, Scorer())


if __name__ == "__main__":
    main()
