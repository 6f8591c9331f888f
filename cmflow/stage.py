"""The stage contract: a stage is a small typed function ``(params, inputs, ctx) -> meta``.

``params`` is an instance of the stage's own pydantic params model, ``inputs`` maps input names to
read-only :class:`Artifact` views of upstream outputs, and ``ctx`` is a :class:`StageContext`. The stage
writes its output files under ``ctx.out_dir`` and returns a small JSON-able dict (numbers, digests) that
lands in the output manifest as ``meta``. The engine then commits the folder as one write-once artifact.

The :func:`stage` decorator only records metadata on the function; the function itself is unchanged,
so tests call it directly with a hand-made context.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    from cmflow.storage import Manifest, Storage


class ParamsModel(BaseModel):
    """Base for stage params: unknown fields are refused, values are frozen."""

    model_config = {"extra": "forbid", "frozen": True}


@dataclass(frozen=True)
class StageDef:
    kind: str
    fn: Callable[..., Mapping[str, Any] | None]
    params_model: type[BaseModel]
    version: str
    inputs: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()
    cache_ignore: tuple[str, ...] = ()
    distributed: bool = False  # runs its own Ray Train workers; the stage task itself takes no CPU/GPU
    description: str = ""

    def code_fingerprint(self) -> dict[str, Any]:
        """The stage's code as cache-key components: its module's import closure, package data, versions
        (:func:`cmflow.fingerprint.fingerprint`)."""
        from cmflow.fingerprint import fingerprint

        return fingerprint(self.fn.__module__).components()


def stage(
    kind: str,
    *,
    params: type[BaseModel],
    version: str = "1",
    inputs: tuple[str, ...] = (),
    optional_inputs: tuple[str, ...] = (),
    cache_ignore: tuple[str, ...] = (),
    distributed: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record a stage's kind, params model, version and inputs on the function (``fn.stage_def``).

    ``distributed=True`` marks a stage that starts its own Ray Train workers (``resources.workers`` of
    ``resources`` each); its coordinating task is then scheduled with no CPU or GPU of its own.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.stage_def = StageDef(  # type: ignore[attr-defined]
            kind=kind,
            fn=fn,
            params_model=params,
            version=version,
            inputs=inputs,
            optional_inputs=optional_inputs,
            cache_ignore=cache_ignore,
            distributed=distributed,
            description=inspect.getdoc(fn) or "",
        )
        return fn

    return wrap


class Artifact:
    """A committed artifact, read only through its manifest."""

    def __init__(self, storage: Storage, manifest: Manifest, cache_dir: Path | None = None) -> None:
        self.storage = storage
        self.manifest = manifest
        self._cache_dir = cache_dir

    @property
    def uri(self) -> str:
        return self.manifest.uri

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.meta

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest.files)

    def read_bytes(self, name: str) -> bytes:
        """The file's bytes, checked against the manifest's sha256."""
        return self.storage.read_artifact_file(self.manifest, name)

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def path(self, name: str) -> Path:
        """A local path to the file (the file itself for local roots, a verified download otherwise)."""
        return self.storage.local_artifact_file(self.manifest, name, self._cache_dir)


class Reporter(Protocol):
    def __call__(self, stage: str, update: Mapping[str, Any]) -> None: ...


@dataclass
class StageContext:
    """Everything a stage may use besides its params and inputs; built by the engine in the worker."""

    run_id: str
    stage: str
    kind: str
    cache_key: str
    seed: int
    out_dir: Path
    storage: Storage
    resources: Any  # cmflow.spec.Resources
    device: str = "cpu"
    work_uri: str = ""  # a durable per-cache-key folder for checkpoints (survives failed attempts)
    tracking: Mapping[str, Any] | None = None
    reporter: Reporter | None = None
    _metrics: list[dict[str, Any]] = field(default_factory=list)
    _timings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_threads(self) -> int:
        return max(1, int(self.resources.cpus)) if self.resources is not None else 1

    def progress(self, done: float, total: float, **info: Any) -> None:
        """Report progress (shown live by the CLI)."""
        if self.reporter is not None:
            self.reporter(self.stage, {"done": done, "total": total, **info})

    def log_metrics(self, step: int, **metrics: float) -> None:
        """Record per-step results (losses): kept in the artifact's metrics.jsonl, shown live, sent to MLflow.

        Only values that a recompute reproduces belong here; timings go to :meth:`log_timing`.
        """
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._metrics.append(row)
        if self.reporter is not None:
            self.reporter(self.stage, {"metrics": row})

    def log_timing(self, step: int = 0, **values: float) -> None:
        """Record how fast the stage ran (img/s, seconds per phase): shown live, sent to MLflow and kept in
        the run record, never in the artifact, so a recompute writes identical bytes and downstream stages
        still hit the cache."""
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._timings.append(row)
        if self.reporter is not None:
            self.reporter(self.stage, {"metrics": row})

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self._metrics)

    @property
    def timing_rows(self) -> list[dict[str, Any]]:
        return list(self._timings)

    @property
    def timings(self) -> dict[str, float]:
        """Each timing value averaged over the rows that logged it (what the run record keeps)."""
        sums: dict[str, list[float]] = {}
        for row in self._timings:
            for key, value in row.items():
                if key != "step":
                    sums.setdefault(key, []).append(float(value))
        return {key: round(sum(v) / len(v), 4) for key, v in sums.items()}
