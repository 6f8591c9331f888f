"""Benchmark of cmflow.metrics on this machine (CPU): extractor throughput and the two FID routes.

    python bench/bench_fid.py

- digits extractor: shipped weights, 8x8 grey input, batch 256;
- inception-v3: random weights in the standard layout (throughput does not depend on the values), 32x32 RGB
  input resized to 299 the legacy-TF way, batch 16;
- FID on random 2048-d positive-definite statistics: eigen route vs scipy sqrtm route (time, relative diff).

Prints a short markdown table last.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from cmflow.metrics.digits_net import load_digits_net
from cmflow.metrics.extractors import DigitsExtractor, InceptionExtractor
from cmflow.metrics.inception import build_fid_inception
from cmflow.metrics.stats import fid_from_stats, fid_from_stats_sqrtm

Extractor = Callable[[torch.Tensor], torch.Tensor]


def images_per_s(extractor: Extractor, batch: torch.Tensor, repeats: int) -> float:
    extractor(batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        extractor(batch)
    return repeats * batch.shape[0] / (time.perf_counter() - t0)


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    rows: list[tuple[str, str, str]] = []

    net, sha = load_digits_net()
    digits = DigitsExtractor(net, sha)
    batch = torch.randint(0, 256, (256, 1, 8, 8), generator=gen, dtype=torch.uint8)
    rate = images_per_s(digits, batch, repeats=40)
    rows.append(("digits features, 1x8x8, batch 256", f"{rate:,.0f} img/s", f"{digits.num_features}-d"))

    inception = InceptionExtractor(build_fid_inception(), "random")
    batch = torch.randint(0, 256, (16, 3, 32, 32), generator=gen, dtype=torch.uint8)
    rate = images_per_s(inception, batch, repeats=3)
    rows.append(("inception-v3 pool3, 3x32x32 -> 299, batch 16", f"{rate:,.1f} img/s", "2048-d"))

    rng = np.random.default_rng(0)
    d = 2048
    b1, b2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    sigma1, sigma2 = b1 @ b1.T / d + 0.1 * np.eye(d), b2 @ b2.T / d + 0.05 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    fid_from_stats(mu1[:64], sigma1[:64, :64], mu2[:64], sigma2[:64, :64])  # warm up LAPACK threads
    fid_eig, t_eig = timed(lambda: fid_from_stats(mu1, sigma1, mu2, sigma2))
    fid_sqrtm, t_sqrtm = timed(lambda: fid_from_stats_sqrtm(mu1, sigma1, mu2, sigma2))
    rel = abs(fid_eig - fid_sqrtm) / abs(fid_sqrtm)
    rows.append(("FID eigen route, 2048-d", f"{t_eig:.2f} s", f"FID {fid_eig:.6f}"))
    rows.append(("FID scipy sqrtm route, 2048-d", f"{t_sqrtm:.2f} s", f"FID {fid_sqrtm:.6f}"))
    rows.append(("eigen vs sqrtm relative difference", f"{rel:.1e}", ""))

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}\n")
    print("| measurement | result | note |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
