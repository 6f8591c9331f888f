"""A fully cached rerun of ``pipelines/digits.yaml``: wall time of ``cmflow run`` when every stage is a hit
(``promote`` has its cache off, so it runs every time), for the code of a baseline commit and for the
working tree, side by side. Goal: <= 3 s.

    bash .ci/netns .venv/bin/python bench/bench_cached_rerun.py [--baseline REV] [--repeats 3]

The full digits job takes 10+ minutes on 2 cores, so the store is filled with a *shortened* digits spec
(the same six stages, MLflow tracking on, register + promote; tiny step and sample counts via ``--set``,
see ``SHORT``). A cached rerun does the same work whatever the step counts: key every stage, check every
manifest, open the tracking store, run ``promote``. Each code version fills its own store first (cache
keys include the code, so the two cannot share one), then times ``--repeats`` reruns as fresh processes.
The baseline is checked out with ``git archive`` into a temporary folder; ``--baseline none`` skips it.

Recorded (2026-12-02, 2 shared cores under load): baseline 6586ee3 15.4 s, working tree 4.7 s
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "stages.teacher.params.preset=tiny",
    "stages.teacher.params.steps=20",
    "stages.teacher.params.checkpoint_every=10",
    "stages.teacher.params.batch_size=32",
    "stages.distill.params.steps=10",
    "stages.distill.params.checkpoint_every=10",
    "stages.distill.params.batch_size=32",
    "stages.distill.resources.cpus=1",
    "stages.evaluate.params.num_samples=64",
    "stages.evaluate.params.seeds=[0]",
    "stages.evaluate.params.teacher_steps=2",
    "stages.evaluate.params.kid_subsets=2",
    "stages.evaluate.params.kid_subset_size=32",
    "stages.evaluate.params.pr_max_samples=64",
]


def cmflow_run(code: Path, root: str) -> float:
    """Seconds one ``cmflow run`` process takes, start to exit (it must succeed)."""
    import yaml

    pipeline = code / "pipelines" / "digits.yaml"  # each revision with its own pipeline file
    register = yaml.safe_load(pipeline.read_text())["stages"]["register"].get("params", {})
    gate = "stages.register.params.gate.max_fid" if "gate" in register else "stages.promote.params.max_fid"
    sets = [f"storage.root={root}", *SHORT, f"{gate}=1.0e9"]  # the gate lives on register since issue 16.6
    argv = [sys.executable, "-m", "cmflow.cli.main", "run", str(pipeline)]
    for item in sets:
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_AUTH_MODE": "disabled", "COLUMNS": "120"}
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=code, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cmflow run failed ({code}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def measure(label: str, code: Path, repeats: int) -> tuple[str, float, list[float]]:
    with tempfile.TemporaryDirectory(prefix="cmflow-bench-cached-") as root:
        fill = cmflow_run(code, root)
        print(f"{label}: filled the store in {fill:.1f} s", file=sys.stderr)
        times = [cmflow_run(code, root) for _ in range(repeats)]
        print(f"{label}: cached reruns {', '.join(f'{t:.2f}' for t in times)} s", file=sys.stderr)
    return label, statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="6586ee3", help="git revision of today's code, or 'none'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--git", default=str(REPO), help="the git checkout the baseline comes from")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cmflow-bench-baseline-") as old:
        if args.baseline != "none":
            archive = subprocess.run(
                ["git", "-C", args.git, "archive", args.baseline], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
            rows.append(measure(f"baseline {args.baseline}", Path(old), args.repeats))
        rows.append(measure("working tree", REPO, args.repeats))
    print(f"\n| code | fully cached rerun, median of {args.repeats} (s) | each (s) |\n|---|---|---|")
    for label, median, times in rows:
        print(f"| {label} | {median:.2f} | {' '.join(f'{t:.2f}' for t in times)} |")
    print("\ngoal: <= 3 s (shortened digits spec, see SHORT)")


if __name__ == "__main__":
    main()
