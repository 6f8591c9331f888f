"""Training throughput under a competing CPU load: OpenMP's spin-waiting against cmflow's thread settings.

    python bench/bench_threads.py [--threads 2] [--seconds 20]

Runs the digits teacher's training step (EDM loss, the ``digits`` UNet, batch 128, 8x8) in fresh
subprocesses, each for ``--seconds``, four ways: idle or next to a competing 2-thread CPU load (a torch
matmul loop in another process), with OpenMP's default waiting (threads spin ~0.2 s after each parallel
region) or with the environment cmflow gives its Ray workers (:data:`cmflow.engine.ray_runtime.WORKER_ENV`:
passive waiting, threads sized to the task). Prints img/s and the loaded/idle ratio of each; the goal is
>= 40 % of idle under load (2 cores shared by two 2-thread jobs leave a fair 50 %). Run it on an otherwise
idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STEP = r"""
import json, sys, time, torch
from cmflow.diffusion.losses import EDMLoss
from cmflow.models import EDMPrecond, make_unet
torch.set_num_threads(int(sys.argv[1]))
net = EDMPrecond(make_unet("digits", 8, 1))
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
x = torch.rand(128, 1, 8, 8) * 2 - 1
loss_fn = EDMLoss()
def step():
    opt.zero_grad(set_to_none=True)
    loss_fn(net, x).mean().backward()
    opt.step()
for _ in range(3):
    step()
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[2]):
    step(); n += 1
print(json.dumps({"imgs_per_s": n * 128 / (time.perf_counter() - t0)}))
"""

LOAD = r"""
import torch, time
torch.set_num_threads(2)
a = torch.rand(384, 384)
end = time.time() + 3600
while time.time() < end:
    for _ in range(50):
        (a @ a).sum()
    time.sleep(0.002)   # a bursty load, like another stage's small kernels
"""


def run(threads: int, seconds: float, env: dict[str, str], loaded: bool) -> float:
    competitor = subprocess.Popen([sys.executable, "-c", LOAD], env={**os.environ}) if loaded else None
    try:
        if competitor is not None:
            time.sleep(2.0)  # let it reach its steady state
        out = subprocess.run(
            [sys.executable, "-c", STEP, str(threads), str(seconds)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return float(json.loads(out.strip().splitlines()[-1])["imgs_per_s"])
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def main() -> None:
    from cmflow.engine.ray_runtime import worker_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    spinning = {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""}
    spinning = {k: v for k, v in spinning.items() if v}
    rows = []
    for name, env in (("OpenMP defaults", spinning), ("cmflow worker env", worker_env(args.threads))):
        idle = run(args.threads, args.seconds, env, loaded=False)
        loaded = run(args.threads, args.seconds, env, loaded=True)
        rows.append((name, idle, loaded))
    print(f"| threads={args.threads} | idle img/s | with a 2-thread load | loaded / idle |")
    print("|---|---|---|---|")
    for name, idle, loaded in rows:
        print(f"| {name} | {idle:.0f} | {loaded:.0f} | {loaded / idle:.0%} |")


if __name__ == "__main__":
    main()
