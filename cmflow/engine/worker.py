"""What runs inside the Ray task of one stage: build the context, call the stage, commit its output."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmflow.errors import CmflowError, StageError, TransientError
from cmflow.spec import Resources
from cmflow.stage import Artifact, StageContext
from cmflow.storage import Manifest, Storage


@dataclass
class StageTask:
    """The picklable payload the driver sends: references only, never data."""

    run_id: str
    stage: str
    kind: str
    params: dict[str, Any]
    cache_key: str
    components: dict[str, Any]
    seed: int
    resources: Resources
    storage_root: str
    storage_options: dict[str, Any]
    storage_retries: int = 6
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> manifest JSON
    tracking: dict[str, Any] | None = None
    reporter: Any = None  # a ProgressHub actor handle, or None


class _ThrottledReporter:
    """Forward progress to the driver's ProgressHub at most every ``interval_s`` (metrics rows always kept)."""

    def __init__(self, hub: Any, interval_s: float = 0.5) -> None:
        self.hub = hub
        self.interval_s = interval_s
        self._last = 0.0
        self._pending: dict[str, Any] = {}

    def __call__(self, stage: str, update: Mapping[str, Any]) -> None:
        self._pending.update(update)
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self.flush(stage)

    def flush(self, stage: str) -> None:
        if self._pending and self.hub is not None:
            self.hub.update.remote(stage, dict(self._pending))
            self._pending = {}
            self._last = time.monotonic()


def _device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def execute_stage(task: StageTask) -> str:
    """Run one stage and commit its artifact; returns the committed manifest as JSON.

    Stage errors become :class:`StageError` (not retried); storage/network failures stay
    :class:`TransientError` (retried by Ray).
    """
    from cmflow.stages.table import STAGES

    definition = STAGES[task.kind]
    storage = Storage(task.storage_root, task.storage_options, retries=task.storage_retries)
    reporter = _ThrottledReporter(task.reporter) if task.reporter is not None else None
    scratch = Path(tempfile.mkdtemp(prefix=f"cmflow-{task.stage}-"))
    out_dir = scratch / "out"
    out_dir.mkdir()
    try:
        inputs = {
            name: Artifact(storage, Manifest.from_json(text), scratch / "in")
            for name, text in task.inputs.items()
        }
        ctx = StageContext(
            run_id=task.run_id,
            stage=task.stage,
            kind=task.kind,
            cache_key=task.cache_key,
            seed=task.seed,
            out_dir=out_dir,
            storage=storage,
            resources=task.resources,
            device=_device() if task.resources.gpus > 0 else "cpu",
            work_uri=storage.uri(Storage.work_prefix(task.kind, task.cache_key)),
            tracking=task.tracking,
            reporter=reporter,
        )
        params = definition.params_model.model_validate(task.params)
        tracker = _stage_tracker(task, ctx)
        try:
            meta = dict(definition.fn(params, inputs, ctx) or {})
            if ctx.metrics:
                with open(out_dir / "metrics.jsonl", "w") as handle:
                    handle.writelines(json.dumps(row) + "\n" for row in ctx.metrics)
            manifest = storage.commit(
                task.kind,
                task.cache_key,
                out_dir,
                meta=meta,
                key_components=task.components,
                producer={"run_id": task.run_id, "stage": task.stage},
            )
        except BaseException as exc:
            if tracker is not None:
                tracker.finish(status="FAILED")
            raise exc
        if tracker is not None:
            tracker.log_outputs(manifest, ctx.metrics + ctx.timing_rows)
            tracker.finish(status="FINISHED")
        if reporter is not None:
            reporter.flush(task.stage)
        data = json.loads(manifest.to_json())
        data["uri"] = manifest.uri
        data["node_id"] = _node_id()
        data["timings"] = ctx.timings  # run-record only: never part of the artifact
        return json.dumps(data)
    except (TransientError, StageError):
        raise
    except CmflowError as exc:
        raise StageError(f"stage {task.stage!r} ({task.kind}): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a bug or bad data inside the stage
        tb = traceback.format_exc()
        error = StageError(
            f"stage {task.stage!r} ({task.kind}) failed: {type(exc).__name__}: {exc}; fix the cause, then "
            f"`cmflow resume {task.run_id}`"
        )
        error.traceback = tb  # type: ignore[attr-defined]
        raise error from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _node_id() -> str:
    ray = sys.modules.get("ray")  # a stage the driver runs itself may run where Ray was never imported
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - informational only
        return ""


def _stage_tracker(task: StageTask, ctx: StageContext) -> Any:
    """A child MLflow run for this stage when the pipeline tracks (see :mod:`cmflow.engine.tracking`)."""
    if not task.tracking:
        return None
    from cmflow.engine.tracking import StageTracker

    return StageTracker.start(task.tracking, task, ctx)
