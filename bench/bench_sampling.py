"""Sampling throughput on CPU: EDM Heun teacher (NFE 35) vs 1- and 2-step consistency sampling.

Same backbone (UNet preset, default "digits" at 8x8x1), same batch, same threads; weights are random (speed
does not depend on them). Reports the median wall time per batch over ``--repeats`` runs after one warm-up
run; the runs of the three samplers are interleaved so that a shared, loaded machine affects them alike.

    .venv/bin/python bench/bench_sampling.py --threads 2 --batch 128 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from cmflow.diffusion import StackedRandomGenerator, cm_sample, edm_sampler
from cmflow.models import CMPrecond, EDMPrecond, make_unet


class _Counting(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def _interleaved_medians(fns: list[Callable[[], torch.Tensor]], repeats: int) -> list[float]:
    """Median wall time of each fn; repeats are interleaved so that all samplers see the same machine load."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--batch", type=int, default=128, help="images per batch")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per sampler (median reported)")
    ap.add_argument("--preset", default="digits", help="UNet preset")
    ap.add_argument("--resolution", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--teacher-steps", type=int, default=18, help="Heun steps (NFE = 2N - 1)")
    ap.add_argument("--mid-sigma", type=float, default=0.821, help="2-step midpoint tau_1")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = make_unet(args.preset, args.resolution, args.channels).eval()
    n_params = sum(p.numel() for p in backbone.parameters())
    teacher = _Counting(EDMPrecond(backbone))
    student = _Counting(CMPrecond(backbone))
    shape = (args.batch, args.channels, args.resolution, args.resolution)

    def latents() -> tuple[torch.Tensor, StackedRandomGenerator]:
        gen = StackedRandomGenerator("cpu", range(args.batch))
        return gen.randn(shape), gen

    def run_teacher() -> torch.Tensor:
        z, _ = latents()
        return edm_sampler(teacher, z, num_steps=args.teacher_steps)

    def run_cm(sigmas: list[float]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            z, gen = latents()
            return cm_sample(student, z, sigmas, generator=gen)

        return run

    samplers = (
        (f"EDM Heun teacher ({args.teacher_steps} steps)", teacher, run_teacher),
        ("CM 1-step", student, run_cm([80.0])),
        (f"CM 2-step (80, {args.mid_sigma})", student, run_cm([80.0, args.mid_sigma])),
    )
    with torch.inference_mode():
        nfes = []
        for _, net, fn in samplers:
            net.calls = 0
            fn()
            nfes.append(net.calls)
        seconds = _interleaved_medians([fn for _, _, fn in samplers], args.repeats)
    rows = [
        (name, nfe, sec, args.batch / sec)
        for (name, _, _), nfe, sec in zip(samplers, nfes, seconds, strict=True)
    ]

    base = rows[0][3]
    res = f"{args.resolution}x{args.resolution}x{args.channels}"
    print(
        f"preset={args.preset} ({n_params / 1e6:.2f} M params) {res}, batch={args.batch}, "
        f"threads={args.threads}, repeats={args.repeats} (median), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    print()
    head = ("sampler", "NFE", "s / batch", "ms / NFE", "images/s", "speed-up")
    print(f"| {head[0]:<32} | {head[1]:>3} | {head[2]:>9} | {head[3]:>8} | {head[4]:>9} | {head[5]:>8} |")
    print(f"|{'-' * 34}|{'-' * 5}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, nfe, sec, ips in rows:
        ms_per_nfe = 1000 * sec / nfe
        print(
            f"| {name:<32} | {nfe:>3} | {sec:>9.4f} | {ms_per_nfe:>8.1f} | {ips:>9.1f} | {ips / base:>7.1f}x |"
        )


if __name__ == "__main__":
    main()
