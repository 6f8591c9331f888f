"""MLflow tracking for pipeline runs: one parent run per pipeline run, one nested child run per stage.

The driver opens the parent run (:class:`PipelineTracker`) and keeps it RUNNING until the pipeline ends;
each stage task opens its own child run in the worker process (:class:`StageTracker`) with
``mlflow.parentRunId`` set to the parent, so nesting works across Ray processes. Cache hits get a small
child run of their own (``cmflow.cache_hit=true``, the key, the manifest URI and the run that produced it).

Everything goes through an explicit ``MlflowClient`` (never the fluent active-run stack or the global
tracking URI). Params and tags pass through :func:`cmflow.redact.redact`, so storage credentials and URI
passwords never reach MLflow. Tracking failures after the start are logged as warnings and never fail a
stage or a run.

Default store: ``sqlite:///<storage root>/mlflow.db`` for local roots, with artifacts under
``<root>/mlflow-artifacts`` (the URI is resolved by :func:`cmflow.mlflow_client.resolve_tracking_uri`: ``tracking.uri``, then
``$MLFLOW_TRACKING_URI``, then that default). An ``s3://`` root needs an MLflow server: stage tasks
on other nodes could not share a SQLite file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmflow.errors import CmflowError, StageError
from cmflow.mlflow_client import client_for, experiment_id, resolve_tracking_uri
from cmflow.redact import redact, redact_uri
from cmflow.spec import PipelineSpec

if TYPE_CHECKING:
    from cmflow.engine.records import RunRecord, StageRecord
    from cmflow.engine.worker import StageTask
    from cmflow.stage import StageContext
    from cmflow.storage import Manifest

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000  # MLflow 3 limit
BATCH_PARAMS = 100  # MLflow log_batch limits
BATCH_METRICS = 1000
MAX_IMAGES = 32
STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}


# --------------------------------------------------------------------------------------------------
# Helpers


def _artifact_location(uri: str, spec: PipelineSpec) -> str | None:
    """Where a new experiment keeps its artifacts: under the root for SQLite stores (else MLflow's cwd)."""
    root = spec.storage.root
    if not uri.startswith("sqlite:") or ("://" in root and not root.startswith("file://")):
        return None
    path = Path(root[len("file://") :] if root.startswith("file://") else root).resolve()
    return (path / "mlflow-artifacts").as_uri()


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> ``{"a.b": "value"}``; lists and other values as JSON text, truncated for MLflow."""
    out: dict[str, str] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    if prefix:
        out[prefix[:250]] = text[:MAX_PARAM_VALUE]
    return out


def numeric_items(meta: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a (nested) meta dict, keyed ``a.b``."""
    out: dict[str, float] = {}
    for key, value in meta.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(numeric_items(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[name[:250]] = float(value)
    return out


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), BATCH_PARAMS):
        client.log_batch(run_id, params=items[i : i + BATCH_PARAMS])


def log_metric_rows(client: Any, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
    """``rows`` of (key, value, timestamp_ms, step)."""
    from mlflow.entities import Metric

    items = [Metric(k, v, ts, step) for k, v, ts, step in rows]
    for i in range(0, len(items), BATCH_METRICS):
        client.log_batch(run_id, metrics=items[i : i + BATCH_METRICS])


def _warn(what: str, exc: BaseException) -> None:
    log.warning("MLflow tracking: %s failed: %s: %s", what, type(exc).__name__, redact_uri(str(exc))[:300])


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------------
# Driver side


class PipelineTracker:
    """The parent MLflow run of one pipeline run (driver side)."""

    def __init__(
        self, spec: PipelineSpec, record: RunRecord, uri: str, client: Any, experiment: str, run_id: str
    ) -> None:
        self.spec = spec
        self.cmflow_run_id = record.run_id
        self.uri = uri
        self.client = client
        self.experiment_id = experiment
        self.run_id = run_id
        self._finished = False
        self._recorded: dict[str, set[str]] | None = None  # stage -> cache keys already under this parent

    @classmethod
    def start(cls, spec: PipelineSpec, record: RunRecord) -> PipelineTracker:
        """Open (or, on resume, reopen) the parent run; stores its id in ``record.tracking``."""
        try:
            uri = resolve_tracking_uri(spec.tracking.uri, spec.storage.root)
        except CmflowError as exc:
            _mark_failed(spec, record, str(exc))
            raise
        try:
            client = client_for(uri)
            exp = experiment_id(client, spec.tracking.experiment or spec.name, _artifact_location(uri, spec))
            run_id, resumed = cls._open_run(client, exp, spec, record)
        except Exception as exc:  # noqa: BLE001 - connection, store or permission problems
            error = StageError(
                f"MLflow tracking at {redact_uri(uri)} is unavailable ({type(exc).__name__}: "
                f"{redact_uri(str(exc)).splitlines()[0][:200]}); start the server, fix tracking.uri or set "
                "tracking.enabled: false"
            )
            _mark_failed(spec, record, str(error))
            raise error from None
        record.tracking = {"uri": redact_uri(uri), "experiment_id": exp, "parent_run_id": run_id}
        tracker = cls(spec, record, uri, client, exp, run_id)
        if not resumed:
            tracker._recorded = {}  # a fresh parent run has no children yet
        return tracker

    @staticmethod
    def _open_run(client: Any, exp: str, spec: PipelineSpec, record: RunRecord) -> tuple[str, bool]:
        """(parent run id, whether an existing parent run of this cmflow run was reopened)."""
        snapshot = spec.redacted()
        digest = hashlib.sha256(json.dumps(snapshot, sort_keys=True).encode()).hexdigest()
        tags = {
            "cmflow.role": "pipeline",
            "cmflow.run_id": record.run_id,
            "cmflow.pipeline": spec.name,
            "cmflow.spec_digest": digest,
            "cmflow.attempt": str(record.attempts),
            "mlflow.source.name": "cmflow",
        }
        existing = client.search_runs(
            [exp],
            f"tags.`cmflow.run_id` = '{record.run_id}' and tags.`cmflow.role` = 'pipeline'",
            max_results=1,
        )
        if existing:  # a resumed run keeps its parent run
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
        else:
            run_id = client.create_run(exp, tags=tags, run_name=record.run_id).info.run_id
        try:
            log_params(client, run_id, flatten({k: v for k, v in snapshot.items() if k != "description"}))
        except Exception as exc:  # noqa: BLE001 - e.g. a resumed run whose overrides changed a param
            _warn("logging the spec params", exc)
        return run_id, bool(existing)

    def stage_payload(self, stage: str) -> dict[str, Any]:
        """What a stage task needs to open its child run (JSON-able; the URI may carry credentials)."""
        return {
            "uri": self.uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.run_id,
            "pipeline": self.spec.name,
        }

    def stage_cached(self, stage: str, srec: StageRecord) -> None:
        """A child run recording a cache hit: its key, manifest URI and the run that produced it.

        A resumed run reopens its parent run; stages that already have a child run there with the same
        cache key (they finished in an earlier attempt) get no second one.
        """
        try:
            if srec.cache_key in self._recorded_keys().get(stage, set()):
                return
            tags = {
                **_stage_tags(self.run_id, stage, srec.kind, srec.cache_key, hit=True),
                "cmflow.run_id": self.cmflow_run_id,
                "cmflow.manifest_uri": redact_uri(srec.manifest_uri),
                "cmflow.manifest_digest": srec.manifest_digest,
            }
            source = self._producer_run(srec.cache_key)
            if source:
                tags["cmflow.source_run_id"] = source
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=stage).info.run_id
            log_params(self.client, run_id, flatten(redact(self.spec.stages[stage].params)))
            metrics = numeric_items(srec.meta)
            if metrics:
                now = _now_ms()
                log_metric_rows(self.client, run_id, [(k, v, now, 0) for k, v in metrics.items()])
            self.client.set_terminated(run_id, "FINISHED")
        except Exception as exc:  # noqa: BLE001 - tracking never fails the pipeline
            _warn(f"recording the cache hit of {stage}", exc)

    def _recorded_keys(self) -> dict[str, set[str]]:
        if self._recorded is None:
            self._recorded = {}
            children = self.client.search_runs(
                [self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.run_id}'", max_results=1000
            )
            for run in children:
                tags = run.data.tags
                if run.info.status == "FINISHED" and "cmflow.stage" in tags:
                    self._recorded.setdefault(tags["cmflow.stage"], set()).add(
                        tags.get("cmflow.cache_key", "")
                    )
        return self._recorded

    def _producer_run(self, cache_key: str) -> str:
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`cmflow.cache_key` = '{cache_key}' and tags.`cmflow.cache_hit` = 'false'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else ""

    def finish(self, record: RunRecord) -> None:
        """End the parent run with the run's status (idempotent; warns instead of raising)."""
        if self._finished:
            return
        self._finished = True
        try:
            statuses = [s.status for s in record.stages.values()]
            now = _now_ms()
            counts = {
                f"stages_{name}": float(statuses.count(name))
                for name in ("hit", "done", "failed", "stopped", "skipped")
            }
            log_metric_rows(self.client, self.run_id, [(k, v, now, 0) for k, v in counts.items()])
            self.client.set_tag(self.run_id, "cmflow.status", record.status)
            if record.error:
                self.client.set_tag(self.run_id, "cmflow.error", redact_uri(record.error)[:5000])
            self.client.log_dict(self.run_id, redact(record.to_dict()), "cmflow/run.json")
        except Exception as exc:  # noqa: BLE001
            _warn("logging the run summary", exc)
        try:
            self.client.set_terminated(self.run_id, STATUS.get(record.status, "FAILED"))
        except Exception as exc:  # noqa: BLE001
            _warn("ending the pipeline run", exc)


def _mark_failed(spec: PipelineSpec, record: RunRecord, error: str) -> None:
    """The driver saved the record before tracking started: mark it failed so it does not stay 'running'."""
    from cmflow.storage import Storage

    try:
        record.status, record.error = "failed", error
        for srec in record.stages.values():
            srec.status = "skipped" if srec.status == "pending" else srec.status
        record.save(Storage(spec.storage.root, spec.storage.options))
    except Exception as exc:  # noqa: BLE001
        _warn("marking the run failed", exc)


def _stage_tags(parent: str, stage: str, kind: str, cache_key: str, *, hit: bool) -> dict[str, str]:
    return {
        "mlflow.parentRunId": parent,
        "mlflow.runName": stage,
        "cmflow.role": "stage",
        "cmflow.stage": stage,
        "cmflow.kind": kind,
        "cmflow.cache_key": cache_key,
        "cmflow.cache_hit": "true" if hit else "false",
    }


# --------------------------------------------------------------------------------------------------
# Worker side


def _unwrap(inner: Any) -> Any:
    return inner


class _MetricsTap:
    """Wraps ``ctx.reporter``: forwards every update and buffers ``log_metrics`` rows for MLflow.

    A stage may ship its reporter to other processes (Ray Train workers); there the tap unpickles as the
    plain inner reporter, so rows only reach MLflow from the stage's own ``ctx.log_metrics`` calls.
    """

    def __init__(
        self, inner: Any, tracker: StageTracker, flush_every_s: float = 5.0, max_rows: int = 500
    ) -> None:
        self.inner = inner
        self.tracker = tracker
        self.flush_every_s = flush_every_s
        self.max_rows = max_rows
        self.rows: list[tuple[str, float, int, int]] = []
        self._last = time.monotonic()

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return _unwrap, (self.inner,)

    def __call__(self, stage: str, update: Mapping[str, Any]) -> None:
        row = update.get("metrics")
        if isinstance(row, Mapping):
            now, step = _now_ms(), int(row.get("step", 0))
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(float(value)):
                    self.rows.append((str(key), float(value), now, step))
            if len(self.rows) >= self.max_rows or time.monotonic() - self._last >= self.flush_every_s:
                self.flush()
        if self.inner is not None:
            self.inner(stage, update)

    def flush(self, stage: str | None = None) -> None:
        """Send the buffered rows (and flush the inner reporter when a stage name is given)."""
        rows, self.rows = self.rows, []
        self._last = time.monotonic()
        self.tracker.send_metrics(rows)
        inner_flush = getattr(self.inner, "flush", None)
        if stage is not None and inner_flush is not None:
            inner_flush(stage)


class StageTracker:
    """The child MLflow run of one stage task (worker side)."""

    def __init__(self, client: Any, run_id: str | None, ctx: StageContext) -> None:
        self.client = client
        self.run_id = run_id
        self.ctx = ctx
        self._finished = run_id is None
        self._tap: _MetricsTap | None = None

    @classmethod
    def start(cls, payload: Mapping[str, Any], task: StageTask, ctx: StageContext) -> StageTracker:
        """Open the stage's child run, route ``ctx.log_metrics`` to it and expose its id in ``ctx.tracking``.

        If MLflow is unreachable the stage still runs (untracked), with a warning.
        """
        try:
            client = client_for(payload["uri"])
            tags = {
                **_stage_tags(payload["parent_run_id"], task.stage, task.kind, task.cache_key, hit=False),
                "cmflow.run_id": task.run_id,
                **_ray_tags(),
            }
            run = client.create_run(payload["experiment_id"], tags=tags, run_name=task.stage)
            run_id = run.info.run_id
            log_params(client, run_id, flatten(redact(task.params)))
        except Exception as exc:  # noqa: BLE001
            _warn(f"opening the run of stage {task.stage}", exc)
            return cls(None, None, ctx)
        tracker = cls(client, run_id, ctx)
        tracker._tap = _MetricsTap(ctx.reporter, tracker)
        ctx.reporter = tracker._tap
        ctx.tracking = {**payload, "stage_run_id": run_id}
        return tracker

    def send_metrics(self, rows: list[tuple[str, float, int, int]]) -> None:
        if not rows or self.run_id is None:
            return
        try:
            log_metric_rows(self.client, self.run_id, rows)
        except Exception as exc:  # noqa: BLE001
            _warn("logging stage metrics", exc)

    def log_outputs(self, manifest: Manifest, metrics: list[dict[str, Any]]) -> None:
        """Manifest URI tag and dict, numeric meta as metrics, PNG outputs as image artifacts."""
        if self.run_id is None:
            return
        if self._tap is not None:
            self._tap.flush()
        else:  # the reporter was not tapped: log the rows now
            now = _now_ms()
            self.send_metrics(
                [
                    (k, float(v), now, int(r.get("step", 0)))
                    for r in metrics
                    for k, v in r.items()
                    if k != "step"
                ]
            )
        try:
            self.client.set_tag(self.run_id, "cmflow.manifest_uri", redact_uri(manifest.uri))
            self.client.set_tag(self.run_id, "cmflow.manifest_digest", manifest.digest)
            self.client.log_dict(self.run_id, json.loads(manifest.to_json()), "cmflow/manifest.json")
            meta = numeric_items(manifest.meta)
            if meta:
                now = _now_ms()
                log_metric_rows(self.client, self.run_id, [(k, v, now, 0) for k, v in meta.items()])
            self._log_images(manifest)
        except Exception as exc:  # noqa: BLE001
            _warn(f"logging the outputs of stage {self.ctx.stage}", exc)

    def _log_images(self, manifest: Manifest) -> None:
        pngs = [name for name in sorted(manifest.files) if name.lower().endswith(".png")][:MAX_IMAGES]
        for name in pngs:
            local = self.ctx.out_dir / name
            if not local.is_file():
                local = self.ctx.storage.local_artifact_file(manifest, name)
            folder = str(Path("images", name).parent)
            self.client.log_artifact(self.run_id, str(local), artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        """End the child run (idempotent; warns instead of raising)."""
        if self._finished:
            return
        self._finished = True
        if self._tap is not None:
            self._tap.flush()
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:  # noqa: BLE001
            _warn(f"ending the run of stage {self.ctx.stage}", exc)


def _ray_tags() -> dict[str, str]:
    """Ray task/node/job ids of the current worker, when inside Ray (a stage the driver runs itself, with
    Ray never imported, has none: importing Ray just to learn that costs a second)."""
    ray = sys.modules.get("ray")
    try:
        if ray is None or not ray.is_initialized():
            return {}
        rc = ray.get_runtime_context()
        ids = {"ray.node_id": rc.get_node_id(), "ray.job_id": rc.get_job_id()}
        if rc.worker.mode == ray._private.worker.WORKER_MODE:  # in the driver Ray warns and returns None
            ids["ray.task_id"] = rc.get_task_id()
        return {k: str(v) for k, v in ids.items() if v}
    except Exception:  # noqa: BLE001 - best effort
        return {}
