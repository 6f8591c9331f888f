"""Pipeline overhead: a fully cached rerun (end to end, in a fresh process) and the per-stage
orchestration cost of a no-op stage (Ray task + cache lookup + commit + manifest + run record).

    bash .ci/netns .venv/bin/python bench/bench_pipeline.py [--spec pipelines/digits.yaml] [--repeats 5]

With ``--spec`` the spec is run once (if not cached yet) and then rerun fully cached ``--repeats`` times
with ``cmflow run`` in a fresh process each time (Python start, imports, plan; Ray is started only when a
stage must run, so a fully cached run never starts it). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CMFLOW = str(Path(sys.executable).with_name("cmflow"))


def chain_spec(root: str, length: int) -> dict:
    stages = {"s0": {"kind": "demo.arrays", "params": {"n": 1}}}
    for i in range(1, length):
        stages[f"s{i}"] = {"kind": "demo.reduce", "inputs": {"a": f"s{i - 1}"}}
    return {"name": "chain", "storage": {"root": root}, "tracking": {"enabled": False}, "stages": stages}


def timed_run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([CMFLOW, *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def per_stage_overhead(root: str, length: int, repeats: int) -> tuple[float, float, float]:
    """(ray start s, median ms per no-op stage, cache-lookup ms per stage) on a warm local Ray."""
    from cmflow.engine import run_pipeline
    from cmflow.engine.ray_runtime import RayRuntime
    from cmflow.validate import validate_spec

    runtime = RayRuntime(num_cpus=2)  # the private local Ray the engine starts, timed as the engine starts it
    start = time.perf_counter()
    runtime.start()
    ray_start = time.perf_counter() - start
    try:
        spec = validate_spec(chain_spec(root, length))
        run_pipeline(spec)  # warm the workers
        per_stage = []
        for _ in range(repeats):
            start = time.perf_counter()
            run_pipeline(spec, no_cache=list(spec.stages))
            per_stage.append((time.perf_counter() - start) / length * 1000)
        start = time.perf_counter()
        run_pipeline(spec)
        lookup_ms = (time.perf_counter() - start) / length * 1000
    finally:
        runtime.stop()
    return ray_start, statistics.median(per_stage), lookup_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=None, help="also time a fully cached rerun of this spec")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chain", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "demo.yaml"
        demo.write_text(json.dumps(chain_spec(str(Path(tmp) / "demo-root"), 4)))
        timed_run(["run", str(demo)])
        cached = [timed_run(["run", str(demo)]) for _ in range(args.repeats)]
        rows.append(
            ("fully cached rerun, 4 demo stages (fresh process)", f"{statistics.median(cached):.2f} s")
        )
        if args.spec:
            timed_run(["run", args.spec])
            cached = [timed_run(["run", args.spec]) for _ in range(args.repeats)]
            rows.append(
                (
                    f"fully cached rerun of {args.spec} (fresh process)",
                    f"{statistics.median(cached):.2f} s (min {min(cached):.2f})",
                )
            )
        ray_start, per_stage_ms, lookup_ms = per_stage_overhead(
            str(Path(tmp) / "chain"), args.chain, args.repeats
        )
        rows.append(("local Ray start (RayRuntime.start)", f"{ray_start:.2f} s"))
        rows.append(
            (
                f"no-op stage, forced miss (median of {args.repeats} × {args.chain}-stage chain)",
                f"{per_stage_ms:.0f} ms/stage",
            )
        )
        rows.append(("cache hit (lookup + verify + record)", f"{lookup_ms:.1f} ms/stage"))
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
