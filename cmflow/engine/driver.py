"""The pipeline driver: plan, cache lookups, Ray dispatch, the run record, resume.

Stages run in dependency order; every ready stage is dispatched at once as a Ray task with options
from its resources, so independent branches run concurrently. Only artifact references (manifest JSON)
cross stage boundaries. Ray retries a task only on :class:`TransientError` (and on lost workers). Kinds
that need no compute (:data:`cmflow.stages.table.IN_DRIVER`: register, promote) run in the driver itself.
Ray is started lazily, when a stage must run on it: a fully cached run never starts it, nor does a rerun
whose only misses are registry stages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cmflow import cache
from cmflow.engine.ray_runtime import RayRuntime
from cmflow.engine.records import RunRecord, StageRecord, check_run_id, list_runs, new_run_id, utcnow
from cmflow.engine.worker import StageTask, execute_stage
from cmflow.errors import CmflowError, StageError, TransientError, UsageError
from cmflow.spec import PipelineSpec
from cmflow.stages.table import IN_DRIVER, STAGES
from cmflow.storage import Manifest, Storage

log = logging.getLogger(__name__)

#: how often the driver writes its running stages' latest progress to ``runs/<run_id>/progress.json``
PROGRESS_SAVE_S = 10.0

Listener = Callable[[RunRecord, dict[str, dict[str, Any]]], None]


@dataclass(frozen=True)
class PlanRow:
    stage: str
    kind: str
    decision: str  # "hit" | "run" | "run (upstream runs)" | "run (cache off)"
    cache_key: str
    reason: str


def progress_key(run_id: str) -> str:
    return f"runs/{run_id}/progress.json"


def load_progress(storage: Storage, record: RunRecord) -> dict[str, dict[str, Any]]:
    """The latest progress the driver saved for the record's running stages ({} when there is none)."""
    if not any(s.status == "running" for s in record.stages.values()):
        return {}
    try:
        data = storage.read_json(progress_key(record.run_id))
    except (CmflowError, OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


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


def plan(spec: PipelineSpec, no_cache: Iterable[str] = (), *, explain: bool = True) -> list[PlanRow]:
    """Which stages would hit or run, decided from the store alone (nothing runs, Ray is not started).

    With ``explain``, a stage the store has no output for says what changed since the latest earlier run of
    the pipeline (its params, an input, the code), as ``cmflow cache explain`` would."""
    storage = storage_for(spec)
    earlier: list[RunRecord] | None = None
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
            reason = found.reason
            if explain and found.manifest is None and reason == "not computed before":
                if earlier is None:
                    earlier = [r for r in list_runs(storage) if r.pipeline == spec.name]
                reason = _what_changed(earlier, name, components) or reason
            rows.append(PlanRow(name, stage.kind, "run", key, reason))
    return rows


def _what_changed(earlier: list[RunRecord], stage: str, components: dict[str, Any], most: int = 3) -> str:
    """``params.lr 0.0002 → 0.0003`` (at most ``most`` leaves, params first) against the latest earlier run
    that keyed ``stage``; "" when there is none or nothing differs."""
    previous = next(
        (
            r.stages[stage].components
            for r in reversed(earlier)
            if r.stages.get(stage) and r.stages[stage].components
        ),
        None,
    )
    if previous is None:
        return ""
    previous = {k: v for k, v in previous.items() if k != "nonce"}  # a forced recompute's own key
    changed = [d for d in cache.explain(components, previous) if d.status != "same"]
    if not changed:
        return ""
    changed.sort(key=lambda d: (not d.component.startswith("params."), d.component))
    text = ", ".join(
        f"{d.component} {cache.short(d.previous)} → {cache.short(d.value)}" for d in changed[:most]
    )
    more = f" (+{len(changed) - most} more: `cmflow cache explain`)" if len(changed) > most else ""
    return f"changed since the last run: {text}{more}"


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
    """Run (or resume, with the same ``run_id``) a validated pipeline; returns the final run record.

    Each round dispatches what is ready (cache hits are recorded, misses start as Ray tasks or, for kinds
    that need no compute, run here in the driver), then collects a finished Ray task; the run ends when
    nothing is running. Ray starts only when a stage has to run on it.
    """
    run = _Run(spec, no_cache, run_id, address, listener)
    try:
        run.tracker = _pipeline_tracker(spec, run.record)
        while True:
            run.dispatch()
            if not run.running:
                break
            run.collect(poll_s)
        run.conclude()
    except BaseException as exc:
        run.abort(exc)
        raise
    finally:
        run.close()
    return run.record


class _Run:
    """The state of one :func:`run_pipeline` call: the record, digests and manifests so far, running tasks."""

    def __init__(
        self,
        spec: PipelineSpec,
        no_cache: Iterable[str],
        run_id: str | None,
        address: str | None,
        listener: Listener | None,
    ) -> None:
        self.spec = spec
        self.storage = storage_for(spec)
        self.forced = _check_stage_names(spec, no_cache)
        self.order = spec.topological_order()
        self.listener = listener
        self.record = _start_record(spec, self.storage, self.order, run_id)
        # The record is written once work starts (a stage dispatched) or the run ends; a run refused up
        # front (bad resources) leaves nothing in the store.
        self.persist = run_id is not None
        if self.persist:
            self.record.save(self.storage)
        self.runtime = RayRuntime(address=address or spec.ray.address, num_cpus=spec.ray.num_cpus)
        self.tracker: Any = None
        self.digests: dict[str, str] = {}
        self.manifests: dict[str, str] = {}  # stage -> manifest JSON (with uri)
        self.running: dict[Any, str] = {}  # ObjectRef -> stage
        self._progress_saved = time.monotonic()
        on_ray = [
            row.stage
            for row in plan(spec, self.forced, explain=False)
            if row.decision != "hit" and spec.stages[row.stage].kind not in IN_DRIVER
        ]
        if on_ray:  # refuse what no node can place before anything is written or tracked
            self._start_ray(on_ray)

    def _start_ray(self, stages: list[str]) -> None:
        self.runtime.start()
        try:
            self.runtime.check_feasible((n, self.spec.stages[n].resources) for n in stages)
        except BaseException:
            self.runtime.stop()
            raise

    def notify(self) -> None:
        """Hand the record and the running stages' progress to the listener; every
        :data:`PROGRESS_SAVE_S` also write that progress next to the run record (``cmflow status``)."""
        due = self.running and time.monotonic() - self._progress_saved >= PROGRESS_SAVE_S
        progress = self.runtime.progress() if self.running and (self.listener or due) else {}
        stages = self.record.stages
        live = {n: p for n, p in progress.items() if n in stages and stages[n].status == "running"}
        if due and live:  # (once the run ends nothing is running: the last saved step stays)
            self._progress_saved = time.monotonic()
            try:
                self.storage.write_json(progress_key(self.record.run_id), live)
            except CmflowError as exc:  # the display must never break a run
                log.warning("could not save the run's progress: %s", exc)
        if self.listener is not None:
            self.listener(self.record, progress)

    def save(self) -> None:
        self.persist = True
        self.record.save(self.storage)

    # -- dispatch -------------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Settle every ready pending stage: skip it, record a hit, or start it (Ray task or in the driver)."""
        while True:
            changed, here = False, []
            for name in self.order:
                srec = self.record.stages[name]
                if srec.status != "pending":
                    continue
                upstream = list(self.spec.stages[name].inputs.values())
                if any(self.record.stages[u].status in {"failed", "skipped"} for u in upstream):
                    srec.status, srec.reason = "skipped", "an upstream stage failed"
                    changed = True
                elif all(u in self.digests for u in upstream):
                    changed = True
                    if not self._lookup(name):
                        if self.spec.stages[name].kind in IN_DRIVER:
                            here.append(name)
                        else:
                            self._launch(name)
            if changed:
                self.persist = self.persist or bool(self.running)
                if self.persist:
                    self.record.save(self.storage)
                self.notify()
            for name in here:
                self._run_here(name)
            if not here:  # a stage run here may have readied its dependents: look again
                return

    def _lookup(self, name: str) -> bool:
        """Compute the stage's key; True (and the stage recorded as a hit) when the store has its output."""
        stage, srec = self.spec.stages[name], self.record.stages[name]
        srec.components = _components(self.spec, name, self.digests)
        cached = name not in self.forced and stage.cache.enabled
        if not cached:
            # a forced recompute commits under its own key, so its fresh output is not dropped in favour
            # of an earlier manifest (artifacts are write-once)
            srec.components["nonce"] = f"{self.record.run_id}/{self.record.attempts}"
        srec.cache_key = cache.cache_key(srec.components)
        if not cached:
            srec.reason = "cache disabled for this run"
            return False
        found = cache.lookup(self.storage, stage.kind, srec.cache_key)
        if not (found.hit and found.manifest is not None):
            srec.reason = found.reason
            return False
        _finish(srec, "hit", found.manifest)
        self.digests[name] = found.manifest.digest
        self.manifests[name] = _manifest_text(found.manifest)
        if self.tracker is not None:
            self.tracker.stage_cached(name, srec)
        return True

    def _task(self, name: str) -> StageTask:
        stage, srec = self.spec.stages[name], self.record.stages[name]
        return StageTask(
            run_id=self.record.run_id,
            stage=name,
            kind=stage.kind,
            params=stage.params,
            cache_key=srec.cache_key,
            components=srec.components,
            seed=self.spec.seed,
            resources=stage.resources,
            storage_root=self.spec.storage.root,
            storage_options=self.spec.storage.options,
            storage_retries=self.spec.storage.retries,
            inputs={inp: self.manifests[up] for inp, up in stage.inputs.items()},
            tracking=self.tracker.stage_payload(name) if self.tracker is not None else None,
            reporter=self.runtime.hub,
        )

    def _launch(self, name: str) -> None:
        """Start the stage as a Ray task (starting Ray first if this is the first stage that needs it)."""
        stage = self.spec.stages[name]
        if self.runtime.hub is None:  # the plan said no Ray work, but an artifact vanished since
            self._start_ray([name])
        options = (
            {"num_cpus": 0, "num_gpus": 0}
            if STAGES[stage.kind].distributed
            else stage.resources.ray_options()
        )
        ref = (
            self.runtime.remote_stage()
            .options(
                **options,
                max_retries=stage.retries,
                retry_exceptions=[TransientError],
                name=f"cmflow:{name}",
            )
            .remote(self._task(name))
        )
        self.running[ref] = name
        srec = self.record.stages[name]
        srec.status, srec.started_at = "running", utcnow()

    def _run_here(self, name: str) -> None:
        """Run a stage that needs no compute in this process (Ray is not started for it); transient
        errors are retried ``retries`` times, as Ray would."""
        srec = self.record.stages[name]
        srec.status, srec.started_at = "running", utcnow()
        self.save()
        self.notify()
        task = self._task(name)
        for attempt in range(self.spec.stages[name].retries + 1):
            try:
                text = execute_stage(task)
            except TransientError as exc:
                if attempt < self.spec.stages[name].retries:
                    continue
                self._failed(name, exc)
            except Exception as exc:  # noqa: BLE001 - classified and recorded
                self._failed(name, exc)
            else:
                self._done(name, text)
            break
        self.save()
        self.notify()

    # -- collect --------------------------------------------------------------------------------------

    def collect(self, poll_s: float) -> None:
        """Wait up to ``poll_s`` for a Ray task to end and record its manifest or its error."""
        import ray

        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=poll_s)
        for ref in ready:
            name = self.running.pop(ref)
            try:
                text = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - classified and recorded
                self._failed(name, _cause(exc))
                continue
            self._done(name, text)
        if ready:
            self.save()
        self.notify()

    def _done(self, name: str, text: str) -> None:
        srec = self.record.stages[name]
        data = json.loads(text)
        srec.node_id = data.pop("node_id", "") or ""
        srec.timings = data.pop("timings", None) or {}
        text = json.dumps(data)
        manifest = Manifest.from_json(text)
        _finish(srec, "done", manifest)
        self.digests[name] = manifest.digest
        self.manifests[name] = text

    def _failed(self, name: str, cause: BaseException) -> None:
        srec = self.record.stages[name]
        srec.status = "failed"
        _stamp_end(srec)
        srec.error = str(cause) if isinstance(cause, CmflowError) else f"{type(cause).__name__}: {cause}"
        srec.traceback = getattr(cause, "traceback", "") or ""

    # -- finish ---------------------------------------------------------------------------------------

    def conclude(self) -> None:
        """Nothing is running or ready: the run succeeded unless a stage failed."""
        self.persist = True
        failed = [n for n in self.order if self.record.stages[n].status == "failed"]
        self.record.status = "failed" if failed else "succeeded"
        if failed:
            self.record.error = f"stage {failed[0]!r} failed: {self.record.stages[failed[0]].error}"

    def abort(self, exc: BaseException) -> None:
        """The driver itself stopped (Ctrl-C, SIGTERM: running stages read ``stopped``) or failed (running
        stages fail); pending stages skip."""
        record = self.record
        stopped = isinstance(exc, KeyboardInterrupt)  # Ctrl-C, or SIGTERM from `cmflow stop`
        record.status = "stopped" if stopped else "failed"
        if stopped:
            record.error = f"stopped; resume with `cmflow resume {record.run_id}`"
        else:
            record.error = str(exc) if isinstance(exc, CmflowError) else f"{type(exc).__name__}: {exc}"
        for srec in record.stages.values():
            if srec.status == "running":
                _stamp_end(srec)  # the time it ran until the driver stopped
            if stopped and srec.status == "running":  # interrupted: keeps the time it ran
                srec.status, srec.reason = "stopped", "the run was stopped"
            elif srec.status == "pending":
                srec.status, srec.reason = (
                    "skipped",
                    "the run was stopped" if stopped else "the driver failed",
                )
            elif srec.status == "running":
                srec.status, srec.error = "failed", srec.error or "the driver failed"

    def close(self) -> None:
        try:
            if self.persist:
                _final_save(self.record, self.storage)
            if self.tracker is not None:
                self.tracker.finish(self.record)
            self.notify()
        finally:
            self.runtime.stop()


def _start_record(spec: PipelineSpec, storage: Storage, order: list[str], run_id: str | None) -> RunRecord:
    """A fresh record, or for a resumed ``run_id`` one that keeps the first attempt's creation time."""
    kinds = {name: spec.stages[name].kind for name in order}
    if run_id is None:
        return RunRecord.start(new_run_id(spec.name), spec.redacted(), kinds)
    check_run_id(run_id)
    record = RunRecord.start(run_id, spec.redacted(), kinds)
    try:
        previous = RunRecord.load(storage, run_id)
    except UsageError:
        return record
    record.created_at, record.attempts = previous.created_at, previous.attempts + 1
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
    _stamp_end(srec)


def _stamp_end(srec: StageRecord) -> None:
    """Set ``ended_at`` now and, for a stage that started, ``seconds``."""
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
