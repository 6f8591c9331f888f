"""Two small demo stage kinds that exercise the engine without torch.

``demo.arrays`` writes deterministic arrays from a seed; ``demo.reduce`` sums the arrays of its inputs.
Test-only knobs (``sleep_s``, ``fail``, ``transient_failures_marker``) let tests prove concurrency,
resume after a failure and retry of transient errors.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

from pydantic import Field

from cmflow.errors import StageError, TransientError
from cmflow.stage import Artifact, ParamsModel, StageContext, stage


class ArraysParams(ParamsModel):
    n: int = Field(16, ge=1, le=10_000_000, description="Number of values.")
    seed: int = Field(0, ge=0)
    sleep_s: float = Field(0.0, ge=0, le=3600, description="Sleep first (tests of concurrency).")
    fail: bool = Field(False, description="Raise a stage error (tests of resume).")
    transient_failures_marker: str | None = Field(
        None, description="Local path: the first attempt creates it and fails transiently (tests of retry)."
    )
    rendezvous_dir: str | None = Field(
        None,
        description="Local folder: announce this stage there and wait for rendezvous_peers (tests of concurrency).",
    )
    rendezvous_peers: int = Field(2, ge=1, le=64)


class ReduceParams(ParamsModel):
    scale: float = 1.0
    sleep_s: float = Field(0.0, ge=0, le=3600)


def _rendezvous(folder: str, name: str, peers: int, timeout_s: float = 60.0) -> None:
    """Announce ``name`` in ``folder`` and wait until ``peers`` stages are there: only concurrent stages meet."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as handle:
        handle.write("here")
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(folder)) < peers:
        if time.monotonic() > deadline:
            raise StageError(
                f"stage {name!r} met {len(os.listdir(folder))} of {peers} peers in {timeout_s:.0f} s"
            )
        time.sleep(0.05)


def _save(ctx: StageContext, name: str, values: Any) -> None:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values), allow_pickle=False)
    (ctx.out_dir / name).write_bytes(buffer.getvalue())


def _load(artifact: Artifact, name: str) -> Any:
    import numpy as np

    return np.load(io.BytesIO(artifact.read_bytes(name)), allow_pickle=False)


@stage(
    "demo.arrays",
    params=ArraysParams,
    version="1",
    cache_ignore=("sleep_s", "transient_failures_marker", "rendezvous_dir", "rendezvous_peers"),
)
def arrays(params: ArraysParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Write ``values.npy``: ``n`` float64 values from ``default_rng(seed)``.

    Examples:
        stages: {a: {kind: demo.arrays, params: {n: 8, seed: 1}}}
    """
    import numpy as np

    marker = params.transient_failures_marker
    if marker and not os.path.exists(marker):
        with open(marker, "w") as handle:
            handle.write(ctx.run_id)
        raise TransientError("demo transient failure (the marker now exists, so a retry succeeds)")
    if params.rendezvous_dir:
        _rendezvous(params.rendezvous_dir, ctx.stage, params.rendezvous_peers)
    if params.fail:
        raise StageError(
            f"stage {ctx.stage!r} was told to fail (params.fail=true); set it to false and resume"
        )
    for i in range(int(params.sleep_s * 10)):
        time.sleep(0.1)
        ctx.progress(i + 1, int(params.sleep_s * 10))
    values = np.random.default_rng(params.seed).standard_normal(params.n)
    _save(ctx, "values.npy", values)
    ctx.log_metrics(0, mean=float(values.mean()))
    return {"n": params.n, "sum": float(values.sum())}


@stage(
    "demo.reduce",
    params=ReduceParams,
    version="1",
    optional_inputs=("a", "b", "c", "d"),
    cache_ignore=("sleep_s",),
)
def reduce(params: ReduceParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Sum the ``values.npy`` of every input, times ``scale``; writes ``values.npy``.

    Examples:
        stages: {r: {kind: demo.reduce, inputs: {a: left, b: right}}}
    """
    import numpy as np

    time.sleep(params.sleep_s)
    arrays_in = [_load(art, "values.npy") for _, art in sorted(inputs.items())]
    total = params.scale * (np.sum(arrays_in, axis=0) if arrays_in else np.zeros(1))
    _save(ctx, "values.npy", total)
    return {"sum": float(np.sum(total)), "inputs": sorted(inputs)}
