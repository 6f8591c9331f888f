"""Ticks: fire every due time of a schedule exactly once, through an injected submitter.

``tick(now, storage, submitter)`` touches nothing but the storage and the submitter. For every due fire it
first *claims* the fire by creating its marker with ``create_only=True``; only the process whose create
succeeds goes on to submit, with the deterministic run id / submission id ``cmflow-<id>-<fire_epoch>``
(``cmflow-<id>-d<digest16>`` for data triggers), which Ray's job server refuses to accept twice. So two
schedulers (an actor and a CronJob, two ticks racing in threads) never fire the same time twice.

Catch-up (fire times missed since the cursor, e.g. while no scheduler ran):
``latest`` fires only the most recent missed time; ``all`` fires each missed time, oldest first, at most
``max_catchup`` of them (the newest ones); ``none`` fires the most recent time only if it is at most
``starting_deadline_s`` old, otherwise it is skipped.

Concurrency (the previous run of this schedule is still PENDING or RUNNING): ``forbid`` skips the new fire
(recorded in its marker), ``allow`` submits anyway, ``replace`` stops the previous run, then submits.

:func:`dry_run` lists what a tick at ``now`` would fire and writes nothing (no marker, no cursor).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from cmflow.errors import CmflowError, UsageError
from cmflow.schedule.cron import UTC, due_fire_times, iso, parse_time, stamp
from cmflow.schedule.store import (
    MAX_ATTEMPTS,
    Schedule,
    ScheduleState,
    load_schedule,
    load_state,
    read_manifest_digest,
    schedule_ids,
    write_state,
)
from cmflow.storage import Storage

ACTIVE = frozenset({"PENDING", "RUNNING"})


class DuplicateSubmission(UsageError):
    """The submission id is already known to the cluster (or the run id to the store)."""


@dataclass(frozen=True)
class Fire:
    """The outcome of one due fire in a tick."""

    schedule_id: str
    run_id: str
    outcome: str  # submitted | skipped | failed | taken (claimed by another); dry run: due | retry
    fire_time: str | None = None
    digest: str | None = None
    reason: str = ""


class Submitter(Protocol):
    """How a tick starts, inspects and stops runs (a Ray job server, the current process, or a fake)."""

    def submit(self, schedule: Schedule, run_id: str, metadata: dict[str, str]) -> None:
        """Start ``run_id``; raise :class:`DuplicateSubmission` if it already exists."""

    def status(self, schedule: Schedule, run_id: str) -> str | None:
        """PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED, or None when unknown."""

    def stop(self, schedule: Schedule, run_id: str) -> None:
        """Stop ``run_id`` (used by concurrency=replace)."""


@dataclass
class _Candidate:
    marker: str
    run_id: str
    fire_time: datetime | None = None
    digest: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def tick(
    now: datetime,
    storage: Storage,
    submitter: Submitter,
    *,
    ids: Iterable[str] | None = None,
) -> list[Fire]:
    """Fire every due time of the given schedules (default: all) exactly once. Safe to run concurrently."""
    fires: list[Fire] = []
    for schedule in _readable(storage, ids, fires):
        sid = schedule.id
        try:
            fires.extend(tick_schedule(schedule, now, storage, submitter))
        except CmflowError as exc:  # one broken schedule (or store hiccup) must not stop the others
            fires.append(Fire(sid, "", "failed", reason=str(exc)))
    return fires


def tick_schedule(schedule: Schedule, now: datetime, storage: Storage, submitter: Submitter) -> list[Fire]:
    """One schedule's tick: retries, then due cron times or a new trigger digest; then the cursor moves."""
    if not schedule.enabled:
        return []
    now = now.astimezone(UTC)
    state = load_state(storage, schedule)
    changes: dict[str, Any] = {}
    fires = [_retry(schedule, key, state, changes, storage, submitter) for key in list(state.retry)]
    try:
        if schedule.cron:
            candidates = _cron_candidates(schedule, state, now)
        else:
            candidates = _trigger_candidates(schedule, state)
    except CmflowError as exc:
        return [*fires, Fire(schedule.id, "", "failed", reason=str(exc))]
    for candidate in candidates:
        fires.append(_fire(schedule, candidate, state, changes, storage, submitter, now))
    if schedule.cron and candidates:  # idle ticks write nothing (finding the due times costs O(1) anyway)
        changes["cursor"] = iso(now)
    _save_changes(storage, schedule, changes)
    return fires


def _cron_candidates(schedule: Schedule, state: ScheduleState, now: datetime) -> list[_Candidate]:
    assert schedule.cron is not None
    cursor = parse_time(state.cursor or schedule.created_at)
    if now <= cursor:
        return []
    limit = schedule.max_catchup if schedule.catchup == "all" else 1
    due = due_fire_times(schedule.cron, schedule.tz, cursor, now, limit)
    if schedule.catchup == "none":
        due = [t for t in due if (now - t).total_seconds() <= schedule.starting_deadline_s]
    return [
        _Candidate(
            marker=f"{schedule.prefix}/ticks/{stamp(t)}.json",
            run_id=f"cmflow-{schedule.id}-{int(t.timestamp())}",
            fire_time=t,
        )
        for t in due
    ]


def _trigger_candidates(schedule: Schedule, state: ScheduleState) -> list[_Candidate]:
    assert schedule.trigger is not None
    digest = read_manifest_digest(schedule.trigger)
    if digest is None or digest == (state.last_digest or schedule.trigger_baseline):
        return []
    return [
        _Candidate(
            marker=f"{schedule.prefix}/triggers/{digest}.json",
            run_id=f"cmflow-{schedule.id}-d{digest[:16]}",
            digest=digest,
        )
    ]


def _precise_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _claimer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _fire(
    schedule: Schedule,
    candidate: _Candidate,
    state: ScheduleState,
    changes: dict[str, Any],
    storage: Storage,
    submitter: Submitter,
    now: datetime,
) -> Fire:
    fire_time = iso(candidate.fire_time) if candidate.fire_time else None
    marker: dict[str, Any] = {
        "schedule_id": schedule.id,
        "run_id": candidate.run_id,
        "fire_time": fire_time,
        "digest": candidate.digest,
        "status": "claimed",
        "reason": "",
        "attempts": 0,
        "claimed_by": _claimer(),
        "claimed_at": _precise_now(),
        "tick_now": iso(now),
    }
    try:
        storage.write_json(candidate.marker, marker, create_only=True)
    except FileExistsError:
        if candidate.digest and not schedule.cron:
            changes["last_digest"] = state.last_digest = candidate.digest
        return Fire(schedule.id, candidate.run_id, "taken", fire_time, candidate.digest, "claimed by another")
    if schedule.cron and schedule.trigger is not None:
        try:
            digest = read_manifest_digest(schedule.trigger)
        except CmflowError as exc:
            return _record(storage, candidate, marker, "failed", str(exc), schedule)
        if digest is None or digest == (state.last_digest or schedule.trigger_baseline):
            return _record(storage, candidate, marker, "skipped", "no new data since the last run", schedule)
        candidate.digest = marker["digest"] = digest
    return _submit(schedule, candidate, marker, state, changes, storage, submitter)


def _submit(
    schedule: Schedule,
    candidate: _Candidate,
    marker: dict[str, Any],
    state: ScheduleState,
    changes: dict[str, Any],
    storage: Storage,
    submitter: Submitter,
) -> Fire:
    previous = state.last_run_id
    if previous and previous != candidate.run_id and schedule.concurrency != "allow":
        try:
            status = submitter.status(schedule, previous)
        except CmflowError as exc:
            reason = f"cannot check run {previous}: {exc}"
            return _failed(schedule, candidate, marker, reason, changes, storage)
        if status in ACTIVE:
            if schedule.concurrency == "forbid":
                reason = f"previous run {previous} is still {status} (concurrency=forbid)"
                return _record(storage, candidate, marker, "skipped", reason, schedule)
            try:
                submitter.stop(schedule, previous)
            except CmflowError as exc:
                reason = f"cannot stop run {previous}: {exc}"
                return _failed(schedule, candidate, marker, reason, changes, storage)
            marker["reason"] = f"replaced run {previous}"
    metadata = {"cmflow_schedule": schedule.id, "cmflow_run_id": candidate.run_id}
    if marker.get("fire_time"):
        metadata["cmflow_fire_time"] = marker["fire_time"]
    if candidate.digest:
        metadata["cmflow_trigger_digest"] = candidate.digest
    marker["attempts"] = int(marker.get("attempts", 0)) + 1
    try:
        submitter.submit(schedule, candidate.run_id, metadata)
    except DuplicateSubmission:
        marker["reason"] = (marker["reason"] + "; " if marker["reason"] else "") + "already submitted"
    except Exception as exc:  # noqa: BLE001 - recorded, retried on the next tick
        text = str(exc) if isinstance(exc, CmflowError) else f"{type(exc).__name__}: {exc}"
        return _failed(schedule, candidate, marker, text, changes, storage)
    changes["last_run_id"] = state.last_run_id = candidate.run_id
    if candidate.digest:
        changes["last_digest"] = state.last_digest = candidate.digest
    changes.setdefault("resolved", set()).add(candidate.marker)
    return _record(storage, candidate, marker, "submitted", marker["reason"], schedule)


def _failed(
    schedule: Schedule,
    candidate: _Candidate,
    marker: dict[str, Any],
    reason: str,
    changes: dict[str, Any],
    storage: Storage,
) -> Fire:
    if int(marker.get("attempts", 0)) < MAX_ATTEMPTS:
        changes.setdefault("retry", set()).add(candidate.marker)
        reason = f"{reason} (will retry on the next tick)"
    else:
        changes.setdefault("resolved", set()).add(candidate.marker)
    return _record(storage, candidate, marker, "failed", reason, schedule)


def _record(
    storage: Storage,
    candidate: _Candidate,
    marker: dict[str, Any],
    status: str,
    reason: str,
    schedule: Schedule,
) -> Fire:
    marker.update(status=status, reason=reason, updated_at=iso(datetime.now(UTC)))
    storage.write_json(candidate.marker, marker)  # the claim is ours: overwrite it with the outcome
    return Fire(schedule.id, candidate.run_id, status, marker.get("fire_time"), marker.get("digest"), reason)


def _retry(
    schedule: Schedule,
    key: str,
    state: ScheduleState,
    changes: dict[str, Any],
    storage: Storage,
    submitter: Submitter,
) -> Fire:
    try:
        marker = storage.read_json(key)
    except (FileNotFoundError, json.JSONDecodeError):
        changes.setdefault("resolved", set()).add(key)
        return Fire(schedule.id, "", "skipped", reason=f"retry marker {key} is gone")
    if marker.get("status") != "failed":
        changes.setdefault("resolved", set()).add(key)
        run_id, fire_time, digest = marker.get("run_id", ""), marker.get("fire_time"), marker.get("digest")
        return Fire(schedule.id, run_id, "taken", fire_time, digest, "already settled by another tick")
    when = parse_time(marker["fire_time"]) if marker.get("fire_time") else None
    candidate = _Candidate(marker=key, run_id=marker["run_id"], fire_time=when, digest=marker.get("digest"))
    return _submit(schedule, candidate, marker, state, changes, storage, submitter)


def _save_changes(storage: Storage, schedule: Schedule, changes: dict[str, Any]) -> None:
    """Merge this tick's changes into the stored state (another tick may have written it meanwhile)."""
    if not changes:
        return
    state = load_state(storage, schedule)
    if "cursor" in changes:
        if state.cursor is None or parse_time(changes["cursor"]) > parse_time(state.cursor):
            state.cursor = changes["cursor"]
    for name in ("last_run_id", "last_digest"):
        if name in changes:
            setattr(state, name, changes[name])
    retry = (set(state.retry) | changes.get("retry", set())) - changes.get("resolved", set())
    state.retry = sorted(retry)
    write_state(storage, schedule, state)


def dry_run(now: datetime, storage: Storage, *, ids: Iterable[str] | None = None) -> list[Fire]:
    """What ``tick(now)`` would fire; claims no marker, moves no cursor, submits nothing.

    Outcomes: ``due`` (a tick would claim and submit it; the concurrency policy is checked then), ``retry``
    (a failed submission a tick would retry), ``taken`` (its marker exists: it already fired), ``failed``
    (the schedule or its trigger manifest cannot be read).
    """
    fires: list[Fire] = []
    for schedule in _readable(storage, ids, fires):
        sid = schedule.id
        if not schedule.enabled:
            continue
        now = now.astimezone(UTC)
        state = load_state(storage, schedule)
        for key in state.retry:
            try:
                marker = storage.read_json(key)
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            run_id, fire_time, digest = (
                marker.get("run_id", ""),
                marker.get("fire_time"),
                marker.get("digest"),
            )
            fires.append(Fire(sid, run_id, "retry", fire_time, digest, "its last submission failed"))
        try:
            candidates = (
                _cron_candidates(schedule, state, now)
                if schedule.cron
                else _trigger_candidates(schedule, state)
            )
        except CmflowError as exc:
            fires.append(Fire(sid, "", "failed", reason=str(exc)))
            continue
        for candidate in candidates:
            fire_time = iso(candidate.fire_time) if candidate.fire_time else None
            if storage.exists(candidate.marker):
                fires.append(
                    Fire(sid, candidate.run_id, "taken", fire_time, candidate.digest, "already fired")
                )
                continue
            reason = "only if the manifest has new data" if schedule.cron and schedule.trigger else ""
            fires.append(Fire(sid, candidate.run_id, "due", fire_time, candidate.digest, reason))
    return fires


def _readable(storage: Storage, ids: Iterable[str] | None, fires: list[Fire]) -> Iterator[Schedule]:
    """The schedules named by ``ids`` (a bad one raises), or all of them (a bad one becomes a failed fire)."""
    for sid in schedule_ids(storage) if ids is None else list(ids):
        try:
            yield load_schedule(storage, sid)
        except CmflowError as exc:
            if ids is not None:
                raise
            fires.append(Fire(sid, "", "failed", reason=str(exc)))
