"""Framework overhead: the distill stage's img/s (engine + Ray task + Ray Train worker + checkpoints +
metrics) against a bare PyTorch loop doing the same CD step with the same model, batch and threads.

    bash .ci/netns .venv/bin/python bench/bench_overhead.py [--steps 300] [--threads 2]

The stage's img/s comes from its own per-step metrics (``metrics.jsonl``, steady state after the first
log rows); the bare loop is timed over the same number of steps after a warm-up. Goal: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch


def bare_loop(steps: int, batch: int, threads: int, images: torch.Tensor) -> float:
    from cmflow.diffusion.ema import ema_update, ema_warmup_rate
    from cmflow.diffusion.losses import CDLoss
    from cmflow.models import CMPrecond, EDMPrecond, make_unet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = EDMPrecond(make_unet("digits", 8, 1)).eval().requires_grad_(False)
    student = CMPrecond(copy.deepcopy(teacher.backbone)).train().requires_grad_(True)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    loss_fn = CDLoss(num_scales=10, distance="l2")
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-4)
    generator = torch.Generator().manual_seed(0)

    def step(k: int) -> None:
        idx = torch.randint(0, images.shape[0], (batch,), generator=generator)
        loss = loss_fn(student, target, teacher, images[idx], generator=generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(target, student, 0.95)
        ema_update(ema, student, ema_warmup_rate(k, 0.999))

    for k in range(10):
        step(k)
    start = time.perf_counter()
    for k in range(steps):
        step(k)
    return steps * batch / (time.perf_counter() - start)


def stage_imgs_per_s(steps: int, batch: int, threads: int, root: str) -> float:
    from cmflow.engine import run_pipeline, storage_for
    from cmflow.validate import validate_spec

    spec = validate_spec(
        {
            "name": "overhead",
            "storage": {"root": root},
            "tracking": {"enabled": False},
            "ray": {"num_cpus": threads},
            "stages": {
                "data": {"kind": "prepare_data", "params": {"source": "sklearn-digits", "use_labels": False}},
                "teacher": {
                    "kind": "teacher",
                    "inputs": {"data": "data"},
                    "params": {"preset": "digits", "steps": 0, "grid_samples": 0},
                },
                "distill": {
                    "kind": "distill",
                    "inputs": {"teacher": "teacher", "data": "data"},
                    "params": {
                        "num_scales": 10,
                        "mu": 0.95,
                        "distance": "l2",
                        "lr": 2e-4,
                        "batch_size": batch,
                        "steps": steps,
                        "checkpoint_every": 100,
                        "log_every": 25,
                        "grid_samples": 0,
                    },
                    "resources": {"cpus": threads, "workers": 1},
                },
            },
        }
    )
    record = run_pipeline(spec)
    if record.status != "succeeded":
        raise SystemExit(f"the pipeline failed: {record.error}")
    srec = record.stages["distill"]
    manifest = storage_for(spec).load_manifest("distill", srec.cache_key)
    rows = [
        json.loads(line)
        for line in storage_for(spec).read_artifact_file(manifest, "metrics.jsonl").splitlines()
    ]
    rates = [r["imgs_per_s"] for r in rows if "imgs_per_s" in r][2:]  # steady state
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    bare = bare_loop(args.steps, args.batch, args.threads, images)
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_imgs_per_s(args.steps, args.batch, args.threads, tmp)
    rows = [
        ("bare PyTorch CD loop", f"{bare:.0f} img/s"),
        ("distill stage (steady state)", f"{staged:.0f} img/s"),
        ("ratio stage / bare", f"{staged / bare:.2f} (goal >= 0.9)"),
    ]
    print(f"\n| measure (digits preset, batch {args.batch}, {args.threads} threads) | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
