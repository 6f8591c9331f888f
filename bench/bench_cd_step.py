"""Throughput of one consistency-distillation training step (CD: two Heun teacher evaluations, one target
evaluation, one student forward + backward, Adam), at a chosen UNet preset.

    python bench/bench_cd_step.py --preset cifar10 --resolution 32 --channels 3 --batch 256 --bf16   # GPU
    python bench/bench_cd_step.py --preset digits --resolution 8 --channels 1 --batch 128             # CPU

Reports img/s and, from the FLOPs PyTorch's FlopCounterMode counts for one step, achieved TFLOP/s and the
model FLOP utilisation (MFU) against --peak-tflops (default: H200 dense bf16, 989). Median of --repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from cmflow.diffusion.losses import CDLoss
from cmflow.models import CMPrecond, EDMPrecond, make_unet


def build(preset: str, resolution: int, channels: int, device: str):  # noqa: ANN201
    teacher = EDMPrecond(make_unet(preset, resolution, channels)).to(device).eval().requires_grad_(False)
    student = CMPrecond(copy.deepcopy(teacher.backbone)).to(device).train().requires_grad_(True)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    return teacher, student, target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    teacher, student, target = build(args.preset, args.resolution, args.channels, device)
    loss_fn = CDLoss(num_scales=18, distance="l2")
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    images = torch.rand(args.batch, args.channels, args.resolution, args.resolution, device=device) * 2 - 1
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(student, target, teacher, images).mean()
        loss.backward()
        optimizer.step()

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    params = sum(p.numel() for p in student.parameters())
    tflops = flops / median / 1e12
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = [
        ("device", name),
        (
            "preset / input",
            f"{args.preset}, {args.channels}x{args.resolution}x{args.resolution}, batch {args.batch}",
        ),
        ("parameters (student)", f"{params / 1e6:.2f} M"),
        ("precision", "bf16 autocast" if args.bf16 else "fp32"),
        ("CD step (median)", f"{median * 1000:.1f} ms"),
        ("throughput", f"{args.batch / median:.0f} img/s"),
        ("model FLOPs per step", f"{flops / 1e12:.3f} TFLOP"),
        ("achieved", f"{tflops:.1f} TFLOP/s"),
        (
            "MFU",
            f"{100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:g} TFLOP/s"
            if device == "cuda"
            else "n/a on CPU",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
