"""The pipeline driver: plan, cache lookups, Ray dispatch, the run record, resume.

Stages run in dependency order; every ready stage is dispatched at once as a Ray task with options
from its resources, so independent branches run concurrently. Only artifact references (manifest JSON)
cross stage boundaries. Ray retries a task only on :class:`TransientError` (and on lost workers). Ray is
started lazily: a fully cached run never starts it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cmflow import cache
from cmflow.engine.ray_runtime import RayRuntime
from cmflow.engine.records import RunRecord, StageRecord, check_run_id, new_run_id, utcnow
from cmflow.engine.worker import StageTask
from cmflow.errors import CmflowError, StageError, TransientError, UsageError
from cmflow.spec import PipelineSpec
from cmflow.stages.table import STAGES
from cmflow.storage import Manifest, Storage

Listener = Callable[[RunRecord, dict[str, dict[str, Any]]], None]


@dataclass(frozen=True)
class PlanRow:
    stage: str
    kind: str
    decision: str  # "hit" | "run" | "run (upstream runs)" | "run (cache off)"
    cache_key: str
    reason: str


def storage_for(spec: PipelineSpec) -> Storage:
    return Storage(spec.storage.root, spec.storage.options, retries=spec.storage.retries)


def _components(spec: PipelineSpec, name: str, digests: dict[str, str]) -> dict[str, Any]:
    stage = spec.stages[name]
    definition = STAGES[stage.kind]
    return cache.key_components(
        definition,
        stage.params,
        cache_version=stage.cache.version,
        ignore=stage.cache.ignore,
        input_digests={inp: digests[up] for inp, up in stage.inputs.items()},
        seed=spec.seed,
    )


def plan(spec: PipelineSpec, no_cache: Iterable[str] = ()) -> list[PlanRow]:
    """Which stages would hit or run, decided from the store alone (nothing runs, Ray is not started)."""
    storage = storage_for(spec)
    forced = _check_stage_names(spec, no_cache)
    digests: dict[str, str] = {}
    rows: list[PlanRow] = []
    for name in spec.topological_order():
        stage = spec.stages[name]
        if any(up not in digests for up in stage.inputs.values()):
            rows.append(PlanRow(name, stage.kind, "run (upstream runs)", "", "an input will be recomputed"))
            continue
        components = _components(spec, name, digests)
        key = cache.cache_key(components)
        if name in forced or not stage.cache.enabled:
            rows.append(
                PlanRow(name, stage.kind, "run (cache off)", key, "--no-cache or cache.enabled=false")
            )
            continue
        found = cache.lookup(storage, stage.kind, key, repair=False)
        if found.hit and found.manifest is not None:
            digests[name] = found.manifest.digest
            rows.append(PlanRow(name, stage.kind, "hit", key, ""))
        else:
            rows.append(PlanRow(name, stage.kind, "run", key, found.reason))
    return rows


def _check_stage_names(spec: PipelineSpec, names: Iterable[str]) -> set[str]:
    names = set(names)
    unknown = names - set(spec.stages)
    if unknown:
        raise UsageError(
            f"--no-cache names unknown stage(s) {', '.join(sorted(unknown))}; stages are: {', '.join(spec.stages)}"
        )
    return names


def run_pipeline(
    spec: PipelineSpec,
    *,
    no_cache: Iterable[str] = (),
    run_id: str | None = None,
    address: str | None = None,
    listener: Listener | None = None,
    poll_s: float = 0.2,
) -> RunRecord:
    """Run (or resume, with the same ``run_id``) a validated pipeline; returns the final run record."""
    storage = storage_for(spec)
    forced = _check_stage_names(spec, no_cache)
    order = spec.topological_order()
    kinds = {name: spec.stages[name].kind for name in order}
    if run_id is not None:
        check_run_id(run_id)
        try:
            previous = RunRecord.load(storage, run_id)
            record = RunRecord.start(run_id, spec.redacted(), kinds)
            record.created_at, record.attempts = previous.created_at, previous.attempts + 1
        except UsageError:
            record = RunRecord.start(run_id, spec.redacted(), kinds)
    else:
        record = RunRecord.start(new_run_id(spec.name), spec.redacted(), kinds)
    # The record is written once work starts (a task dispatched) or the run ends; a run refused up front
    # (bad resources) leaves nothing in the store.
    persist = run_id is not None
    if persist:
        record.save(storage)

    runtime = RayRuntime(address=address or spec.ray.address, num_cpus=spec.ray.num_cpus)
    to_run = [row.stage for row in plan(spec, forced) if row.decision != "hit"]
    if to_run:  # refuse what no node can place before anything is written or tracked
        runtime.start()
        try:
            runtime.check_feasible((n, spec.stages[n].resources) for n in to_run)
        except BaseException:
            runtime.stop()
            raise
    tracker = None
    digests: dict[str, str] = {}
    manifests: dict[str, str] = {}  # stage -> manifest JSON (with uri)
    running: dict[Any, tuple[str, float]] = {}  # ObjectRef -> (stage, start time)
    blocked: set[str] = set()

    def notify() -> None:
        if listener is not None:
            listener(record, runtime.progress() if running else {})

    try:
        tracker = _pipeline_tracker(spec, record)
        while True:
            launched = False
            for name in order:
                srec = record.stages[name]
                if srec.status != "pending":
                    continue
                stage = spec.stages[name]
                upstream = list(stage.inputs.values())
                if any(record.stages[u].status in {"failed", "skipped"} for u in upstream):
                    srec.status, srec.reason = "skipped", "an upstream stage failed"
                    blocked.add(name)
                    launched = True
                    continue
                if any(u not in digests for u in upstream):
                    continue
                srec.components = _components(spec, name, digests)
                if name in forced or not stage.cache.enabled:
                    # a forced recompute commits under its own key, so its fresh output is not dropped
                    # in favour of an earlier manifest (artifacts are write-once)
                    srec.components["nonce"] = f"{record.run_id}/{record.attempts}"
                srec.cache_key = cache.cache_key(srec.components)
                if name not in forced and stage.cache.enabled:
                    found = cache.lookup(storage, stage.kind, srec.cache_key)
                    if found.hit and found.manifest is not None:
                        _finish(srec, "hit", found.manifest)
                        digests[name] = found.manifest.digest
                        manifests[name] = _manifest_text(found.manifest)
                        if tracker is not None:
                            tracker.stage_cached(name, srec)
                        launched = True
                        continue
                    srec.reason = found.reason
                else:
                    srec.reason = "cache disabled for this run"
                if runtime.hub is None:  # the plan said all hits, but an artifact vanished since
                    runtime.start()
                    runtime.check_feasible([(name, stage.resources)])
                task = StageTask(
                    run_id=record.run_id,
                    stage=name,
                    kind=stage.kind,
                    params=stage.params,
                    cache_key=srec.cache_key,
                    components=srec.components,
                    seed=spec.seed,
                    resources=stage.resources,
                    storage_root=spec.storage.root,
                    storage_options=spec.storage.options,
                    storage_retries=spec.storage.retries,
                    inputs={inp: manifests[up] for inp, up in stage.inputs.items()},
                    tracking=tracker.stage_payload(name) if tracker is not None else None,
                    reporter=runtime.hub,
                )
                options = (
                    {"num_cpus": 0, "num_gpus": 0}
                    if STAGES[stage.kind].distributed
                    else stage.resources.ray_options()
                )
                ref = (
                    runtime.remote_stage()
                    .options(
                        **options,
                        max_retries=stage.retries,
                        retry_exceptions=[TransientError],
                        name=f"cmflow:{name}",
                    )
                    .remote(task)
                )
                running[ref] = (name, time.time())
                srec.status, srec.started_at = "running", utcnow()
                launched = persist = True
            if launched:
                if persist:
                    record.save(storage)
                notify()
            if not running:
                break
            import ray

            ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
            for ref in ready:
                name, _started = running.pop(ref)
                srec = record.stages[name]
                try:
                    text = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - classified and recorded
                    cause = _cause(exc)
                    srec.status, srec.ended_at = "failed", utcnow()
                    srec.error = (
                        str(cause) if isinstance(cause, CmflowError) else f"{type(cause).__name__}: {cause}"
                    )
                    srec.traceback = getattr(cause, "traceback", "") or ""
                    continue
                data = json.loads(text)
                srec.node_id = data.pop("node_id", "") or ""
                srec.timings = data.pop("timings", None) or {}
                text = json.dumps(data)
                manifest = Manifest.from_json(text)
                _finish(srec, "done", manifest)
                digests[name] = manifest.digest
                manifests[name] = text
            if ready:
                record.save(storage)
            notify()
        persist = True
        failed = [n for n in order if record.stages[n].status in {"failed"}]
        record.status = "failed" if failed else "succeeded"
        if failed:
            record.error = f"stage {failed[0]!r} failed: {record.stages[failed[0]].error}"
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt)  # Ctrl-C, or SIGTERM from `cmflow stop`
        record.status = "stopped" if stopped else "failed"
        if stopped:
            record.error = f"stopped; resume with `cmflow resume {record.run_id}`"
        else:
            record.error = str(exc) if isinstance(exc, CmflowError) else f"{type(exc).__name__}: {exc}"
        for srec in record.stages.values():
            if srec.status == "pending" or (stopped and srec.status == "running"):
                srec.status, srec.reason = (
                    "skipped",
                    "the run was stopped" if stopped else "the driver failed",
                )
            elif srec.status == "running":
                srec.status, srec.error = "failed", srec.error or "the driver failed"
        raise
    finally:
        if persist:
            _final_save(record, storage)
        if tracker is not None:
            tracker.finish(record)
        notify()
        runtime.stop()
    return record


def _final_save(record: RunRecord, storage: Storage) -> None:
    """Write the final record; when the run is already unwinding from an error, a failing save (a
    read-only or full store) must not replace that first error."""
    import sys

    unwinding = sys.exc_info()[1] is not None
    try:
        record.save(storage)
    except Exception as exc:  # noqa: BLE001
        if not unwinding:
            raise
        if isinstance(exc, CmflowError) and str(exc) not in record.error:
            record.error = f"{record.error} (the run record could not be written either: {exc})"


def _finish(srec: StageRecord, status: str, manifest: Manifest) -> None:
    srec.status = status
    srec.manifest_uri = manifest.uri
    srec.manifest_digest = manifest.digest
    srec.meta = manifest.meta
    srec.ended_at = utcnow()
    if srec.started_at:
        from datetime import datetime

        srec.seconds = round(
            (datetime.fromisoformat(srec.ended_at) - datetime.fromisoformat(srec.started_at)).total_seconds(),
            3,
        )


def _manifest_text(manifest: Manifest) -> str:
    data = json.loads(manifest.to_json())
    data["uri"] = manifest.uri
    return json.dumps(data)


def _cause(exc: BaseException) -> BaseException:
    """Unwrap Ray's RayTaskError to the stage's own exception."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    if type(exc).__name__ in {"WorkerCrashedError", "OutOfMemoryError", "TaskCancelledError"}:
        return StageError(f"{type(exc).__name__}: the stage's worker died; resume the run to retry")
    return exc


def _pipeline_tracker(spec: PipelineSpec, record: RunRecord) -> Any:
    """MLflow tracking for this run, when enabled (see :mod:`cmflow.engine.tracking`)."""
    if not spec.tracking.enabled:
        return None
    from cmflow.engine.tracking import PipelineTracker

    return PipelineTracker.start(spec, record)


def load_output(spec: PipelineSpec, record: RunRecord, stage: str) -> Manifest:
    """The committed manifest of a stage of a finished run."""
    srec = record.stages.get(stage)
    if srec is None or srec.status not in {"hit", "done"}:
        raise UsageError(
            f"stage {stage!r} of run {record.run_id} has no output (status: "
            f"{srec.status if srec else 'unknown'})"
        )
    manifest = storage_for(spec).load_manifest(srec.kind, srec.cache_key)
    if manifest is None:
        raise UsageError(f"the output of stage {stage!r} is gone from the store; re-run the pipeline")
    return manifest
