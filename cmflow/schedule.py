"""Schedules: cron (with a time zone) and data triggers, fired exactly once by an idempotent ``tick(now)``.

Layout under the storage root::

    schedules/<id>/schedule.json            the schedule: spec snapshot, cron, time zone, policies, enabled
    schedules/<id>/state.json               cursor, last run, last digest, retries (rebuilt from markers)
    schedules/<id>/ticks/<fire>.json        one create-only marker per cron fire time (UTC, 20260302T020000Z)
    schedules/<id>/triggers/<digest>.json   one create-only marker per dataset-manifest digest (trigger-only)

``tick(now, storage, submitter)`` touches nothing but the storage and the submitter, both injected. For every
due fire it first *claims* the fire by creating its marker with ``create_only=True``; only the process whose
create succeeds goes on to submit, with the deterministic run id / submission id ``cmflow-<id>-<fire_epoch>``
(``cmflow-<id>-d<digest16>`` for data triggers), which Ray's job server refuses to accept twice. So two
schedulers (an actor and a CronJob, two ticks racing in threads) never fire the same time twice.

Catch-up (fire times missed since the cursor, e.g. while no scheduler ran):
``latest`` fires only the most recent missed time; ``all`` fires each missed time, oldest first, at most
``max_catchup`` of them (the newest ones); ``none`` fires the most recent time only if it is at most
``starting_deadline_s`` old, otherwise it is skipped.

Concurrency (the previous run of this schedule is still PENDING or RUNNING): ``forbid`` skips the new fire
(recorded in its marker), ``allow`` submits anyway, ``replace`` stops the previous run, then submits.

Daylight-saving time (cron times are local wall-clock times in ``timezone``):

* a wall time that does not exist (spring forward, e.g. 02:30 on 2026-03-29 in Europe/Paris) fires **once, at
  the first valid instant after the gap** (03:00 local); several skipped wall times (``*/15`` between 02:00
  and 03:00) collapse into that one fire;
* a wall time that exists twice (fall back, e.g. 02:30 on 2026-10-25 in Europe/Paris) fires **once, at its
  first occurrence** (02:30 CEST, 00:30 UTC), never a second time an hour later.

Every local wall time fires at most once; use ``timezone: UTC`` for strictly periodic schedules.

A disabled schedule never fires; enabling it again moves its cursor to "now", so times missed while it was
disabled are not caught up. A data trigger fires once per new digest of the dataset manifest it watches
(``trigger.manifest_uri``: a cmflow ``manifest.json`` with a ``digest`` field, read directly, never through a
listing); the digest seen when the schedule was created is the baseline and does not fire. A schedule with
both ``cron`` and ``trigger`` fires at its cron times only when the digest changed since its last run.
Failed submissions are retried on the next ticks (at most ``MAX_ATTEMPTS`` tries, same submission id).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cmflow.errors import CmflowError, InputError, SpecError, UsageError
from cmflow.storage import Storage, open_uri

UTC = timezone.utc
ACTIVE = frozenset({"PENDING", "RUNNING"})
MAX_ATTEMPTS = 3
SCHEDULE_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")


class DuplicateSubmission(UsageError):
    """The submission id is already known to the cluster (or the run id to the store)."""


# --------------------------------------------------------------------------------------------------
# Models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Trigger(_Model):
    """Fire when the digest of a dataset manifest changes."""

    manifest_uri: str = Field(description="URI of a cmflow manifest.json (its 'digest' field is watched).")
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec options to read the manifest.")


class Schedule(_Model):
    """A recurring or data-triggered submission of one pipeline spec."""

    id: str
    spec: dict[str, Any] = Field(description="The validated pipeline spec (JSON), submitted at each fire.")
    cron: str | None = Field(None, description="Five-field cron expression in `timezone`, e.g. '0 3 * * 1'.")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression, e.g. Europe/Paris.")
    catchup: Literal["latest", "all", "none"] = "latest"
    concurrency: Literal["forbid", "allow", "replace"] = "forbid"
    starting_deadline_s: float = Field(300.0, gt=0, description="catchup=none: max lateness.")
    max_catchup: int = Field(24, ge=1, le=1000, description="catchup=all: at most this many missed fires.")
    trigger: Trigger | None = None
    trigger_baseline: str | None = Field(None, description="Manifest digest at creation (does not fire).")
    address: str | None = Field(
        None, description="Ray job server the runs are submitted to (http://HEAD:8265)."
    )
    enabled: bool = True
    created_at: str = Field(description="ISO UTC time; cron fire times after it are due.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not SCHEDULE_ID_RE.match(value):
            raise ValueError(
                f"schedule id {value!r} must be 1-40 lowercase letters, digits or '-', starting with a letter"
            )
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from croniter import croniter

        value = " ".join(value.split())
        if not value.startswith("@") and len(value.split()) != 5:
            raise ValueError(f"cron {value!r} must have 5 fields (minute hour day month weekday)")
        if not croniter.is_valid(value):
            raise ValueError(f"cron {value!r} is not valid; e.g. '0 3 * * 1' is Mondays at 03:00")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"time zone {value!r} is unknown; use an IANA name like Europe/Paris") from None
        return value

    @model_validator(mode="after")
    def _cron_or_trigger(self) -> Schedule:
        if self.cron is None and self.trigger is None:
            raise ValueError("a schedule needs a cron expression, a trigger manifest, or both")
        return self

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def pipeline(self) -> str:
        return str(self.spec.get("name", "?"))

    @property
    def prefix(self) -> str:
        return f"schedules/{self.id}"


class ScheduleState(BaseModel):
    """What ticks remember between runs. A cache: :func:`rebuild_state` recomputes it from the markers."""

    model_config = ConfigDict(extra="ignore")

    cursor: str | None = None  # ISO UTC: every cron fire time at or before it is settled
    last_run_id: str | None = None  # the latest submitted run (for the concurrency policy)
    last_digest: str | None = None  # the manifest digest of the latest submitted run
    retry: list[str] = Field(default_factory=list)  # marker keys whose submission failed
    updated_at: str = ""


@dataclass(frozen=True)
class Fire:
    """The outcome of one due fire in a tick."""

    schedule_id: str
    run_id: str
    outcome: str  # submitted | skipped | failed | taken (another ticker claimed it first)
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


# --------------------------------------------------------------------------------------------------
# Time


def parse_time(text: str | None) -> datetime:
    """ISO 8601 -> aware UTC datetime (a naive time is taken as UTC); None -> now."""
    if text is None:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"time {text!r} is not ISO 8601; write e.g. 2026-03-02T03:00:00Z") from None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def stamp(moment: datetime) -> str:
    """A key-safe UTC time: 20260302T020000Z."""
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _exists(wall: datetime, tz: ZoneInfo) -> bool:
    aware = wall.replace(tzinfo=tz, fold=0)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall


def wall_to_instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant at which the local wall time ``wall`` fires (see the module docstring for DST)."""
    if _exists(wall, tz):
        return wall.replace(tzinfo=tz, fold=0).astimezone(UTC)  # fold=0: the first of two occurrences
    probe = wall.replace(second=0, microsecond=0)
    for _ in range(48 * 60):  # gaps are at most a few hours
        probe += timedelta(minutes=1)
        if _exists(probe, tz):
            return probe.replace(tzinfo=tz, fold=0).astimezone(UTC)
    raise AssertionError(f"no valid local time after {wall} in {tz}")


def due_fire_times(cron: str, tz: ZoneInfo, after: datetime, until: datetime, limit: int) -> list[datetime]:
    """Fire instants ``t`` with ``after < t <= until``: the newest ``limit``, oldest first, no duplicates."""
    from croniter import croniter

    # Walk back in wall-clock time from a little past `until`: the wall -> instant map is monotone, so
    # skipping instants > until and stopping at the first <= after yields exactly the due ones.
    start = until.astimezone(tz).replace(tzinfo=None) + timedelta(hours=3)
    walls = croniter(cron, start)
    found: list[datetime] = []
    while len(found) < limit:
        try:
            instant = wall_to_instant(walls.get_prev(datetime), tz)
        except Exception:  # noqa: BLE001 - croniter gives up on expressions that (almost) never match
            break
        if instant > until:
            continue
        if instant <= after:
            break
        if not found or instant != found[-1]:
            found.append(instant)
    return list(reversed(found))


def next_fire_time(cron: str, tz: ZoneInfo, after: datetime) -> datetime | None:
    """The first fire instant strictly after ``after`` (None if the expression never fires)."""
    from croniter import croniter

    walls = croniter(cron, after.astimezone(tz).replace(tzinfo=None) - timedelta(hours=3))
    for _ in range(10_000):
        try:
            instant = wall_to_instant(walls.get_next(datetime), tz)
        except Exception:  # noqa: BLE001
            return None
        if instant > after:
            return instant
    return None


# --------------------------------------------------------------------------------------------------
# Store


def _schedule_key(schedule_id: str) -> str:
    return f"schedules/{schedule_id}/schedule.json"


def _state_key(schedule_id: str) -> str:
    return f"schedules/{schedule_id}/state.json"


def _validate(data: dict[str, Any], source: str) -> Schedule:
    try:
        return Schedule.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "schedule"
        message = err["msg"].removeprefix("Value error, ")
        raise SpecError(f"{source}: {where}: {message}") from None


def new_schedule(
    spec: dict[str, Any],
    *,
    now: datetime,
    schedule_id: str | None = None,
    cron: str | None = None,
    timezone_name: str = "UTC",
    catchup: str = "latest",
    concurrency: str = "forbid",
    trigger_manifest: str | None = None,
    trigger_options: dict[str, Any] | None = None,
    address: str | None = None,
    starting_deadline_s: float = 300.0,
    max_catchup: int = 24,
) -> Schedule:
    """Build and validate a schedule; a trigger's current digest becomes its baseline."""
    sid = schedule_id or str(spec["name"]).replace("_", "-")[:40]
    trigger = None
    if trigger_manifest:
        trigger = {"manifest_uri": trigger_manifest, "options": trigger_options or {}}
    schedule = _validate(
        {
            "id": sid,
            "spec": spec,
            "cron": cron,
            "timezone": timezone_name,
            "catchup": catchup,
            "concurrency": concurrency,
            "trigger": trigger,
            "address": address,
            "created_at": iso(now),
            "starting_deadline_s": starting_deadline_s,
            "max_catchup": max_catchup,
        },
        "schedule",
    )
    if schedule.cron and next_fire_time(schedule.cron, schedule.tz, now) is None:
        raise SpecError(f"cron {schedule.cron!r} never fires; check the day and month fields")
    if schedule.trigger is not None:
        schedule = schedule.model_copy(update={"trigger_baseline": read_manifest_digest(schedule.trigger)})
    return schedule


def create_schedule(storage: Storage, schedule: Schedule) -> None:
    """Store a new schedule (create-only: an existing id is refused)."""
    try:
        storage.write_json(_schedule_key(schedule.id), schedule.model_dump(mode="json"), create_only=True)
    except FileExistsError:
        raise UsageError(
            f"schedule {schedule.id!r} already exists under {storage.uri()}; pick another --id or "
            f"`cmflow schedule delete {schedule.id}` first"
        ) from None


def load_schedule(storage: Storage, schedule_id: str) -> Schedule:
    if not SCHEDULE_ID_RE.match(schedule_id):
        raise UsageError(f"schedule id {schedule_id!r} is not valid; list them with `cmflow schedule list`")
    try:
        data = storage.read_json(_schedule_key(schedule_id))
    except FileNotFoundError:
        raise UsageError(
            f"no schedule {schedule_id!r} under {storage.uri()}; see `cmflow schedule list --root ROOT`"
        ) from None
    except json.JSONDecodeError:
        raise SpecError(f"{_schedule_key(schedule_id)} is not valid JSON; delete and re-create it") from None
    return _validate(data, _schedule_key(schedule_id))


def schedule_ids(storage: Storage) -> list[str]:
    return [name for name in storage.list("schedules") if SCHEDULE_ID_RE.match(name)]


def list_schedules(storage: Storage) -> list[Schedule]:
    """Every schedule that parses (broken ones are reported by :func:`tick`)."""
    found = []
    for sid in schedule_ids(storage):
        try:
            found.append(load_schedule(storage, sid))
        except CmflowError:
            continue
    return found


def set_enabled(storage: Storage, schedule_id: str, enabled: bool, *, now: datetime) -> Schedule:
    """Enable or disable; enabling moves the cursor to ``now`` (no catch-up of time spent disabled)."""
    schedule = load_schedule(storage, schedule_id).model_copy(update={"enabled": enabled})
    storage.write_json(_schedule_key(schedule_id), schedule.model_dump(mode="json"))
    if enabled:
        state = load_state(storage, schedule)
        state.cursor = iso(now)
        _write_state(storage, schedule, state)
    return schedule


def delete_schedule(storage: Storage, schedule_id: str) -> None:
    load_schedule(storage, schedule_id)
    storage.delete(f"schedules/{schedule_id}", recursive=True)


def load_state(storage: Storage, schedule: Schedule) -> ScheduleState:
    """The stored state, or one rebuilt from the markers when it is missing or unreadable."""
    try:
        return ScheduleState.model_validate(storage.read_json(_state_key(schedule.id)))
    except (FileNotFoundError, json.JSONDecodeError, ValidationError):
        return rebuild_state(storage, schedule)


def rebuild_state(storage: Storage, schedule: Schedule) -> ScheduleState:
    """Recompute the state from the markers alone (after a lost state.json or a scheduler restart)."""
    state = ScheduleState()
    markers = history(storage, schedule)
    fired = [m for m in markers if m.get("fire_time")]
    if fired:
        state.cursor = max(m["fire_time"] for m in fired)
    submitted = [m for m in markers if m.get("status") == "submitted"]
    if submitted:
        latest = max(submitted, key=lambda m: (m.get("fire_time") or "", m.get("claimed_at", "")))
        state.last_run_id, state.last_digest = latest.get("run_id"), latest.get("digest")
    state.retry = [
        m["key"] for m in markers if m.get("status") == "failed" and m.get("attempts", 1) < MAX_ATTEMPTS
    ]
    return state


def _write_state(storage: Storage, schedule: Schedule, state: ScheduleState) -> None:
    state.updated_at = iso(datetime.now(UTC))
    storage.write_json(_state_key(schedule.id), state.model_dump(mode="json"))


def history(storage: Storage, schedule: Schedule) -> list[dict[str, Any]]:
    """Every marker of a schedule (cron ticks and trigger digests), oldest claim first."""
    markers = []
    for folder in ("ticks", "triggers"):
        for name in storage.list(f"{schedule.prefix}/{folder}"):
            if not name.endswith(".json"):
                continue
            key = f"{schedule.prefix}/{folder}/{name}"
            try:
                data = storage.read_json(key)
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            markers.append({**data, "key": key})
    return sorted(markers, key=lambda m: m.get("claimed_at", ""))


# --------------------------------------------------------------------------------------------------
# Data triggers


def read_manifest_digest(trigger: Trigger) -> str | None:
    """The ``digest`` of the watched manifest (None while it does not exist). Reads the object directly."""
    uri = trigger.manifest_uri
    options = dict(trigger.options)
    if "://" in uri and not uri.startswith("file://"):
        options.setdefault("skip_instance_cache", True)  # a fresh client: no stale listing cache
        options.setdefault("use_listings_cache", False)
    try:
        data = open_uri(uri, options)
    except InputError as exc:
        if "does not exist" in str(exc):
            return None
        raise
    try:
        digest = json.loads(data)["digest"]
    except (ValueError, KeyError, TypeError):
        raise InputError(
            f"trigger manifest {uri} has no 'digest' field; point --trigger-manifest at a manifest.json"
        ) from None
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{16,128}", digest):
        raise InputError(f"trigger manifest {uri} has a malformed digest {str(digest)[:20]!r}; want sha256")
    return digest


# --------------------------------------------------------------------------------------------------
# Tick


def tick(
    now: datetime,
    storage: Storage,
    submitter: Submitter,
    *,
    ids: Iterable[str] | None = None,
) -> list[Fire]:
    """Fire every due time of the given schedules (default: all) exactly once. Safe to run concurrently."""
    fires: list[Fire] = []
    for sid in schedule_ids(storage) if ids is None else list(ids):
        try:
            schedule = load_schedule(storage, sid)
        except CmflowError as exc:
            if ids is not None:
                raise
            fires.append(Fire(sid, "", "failed", reason=str(exc)))
            continue
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
    _write_state(storage, schedule, state)


# --------------------------------------------------------------------------------------------------
# KubeRay export


def kuberay_cronjob(
    schedule: Schedule,
    *,
    root: str,
    image: str,
    namespace: str = "default",
    gpu_workers: int = 1,
    tracking_uri: str = "http://mlflow.mlflow.svc:5000",
) -> dict[str, Any]:
    """A KubeRay ``RayCronJob`` (KubeRay >= 1.6, alpha; ``timeZone`` needs >= 1.7) firing this schedule.

    Each RayJob it creates runs ``cmflow schedule tick <id> --inline`` on its own ephemeral cluster: the tick
    claims the fire time's marker in the storage root (so history and exactly-once are shared with the
    other tick drivers) and runs the pipeline in that Ray job.
    """
    if schedule.cron is None:
        raise UsageError(f"schedule {schedule.id!r} has no cron; a RayCronJob needs one (use the scheduler)")
    entrypoint = f"python -m cmflow.cli.main schedule tick {schedule.id} --root {root} --inline"
    container = {
        "image": image,
        "envFrom": [{"secretRef": {"name": "cmflow-s3"}}],  # cluster/kuberay/secrets.example.yaml
        "env": [
            {"name": "MLFLOW_TRACKING_URI", "value": tracking_uri},
            {"name": "RAY_TRAIN_V2_ENABLED", "value": "1"},
        ],
    }
    head = {
        **container,
        "name": "ray-head",
        "resources": {"limits": {"cpu": "4", "memory": "16Gi"}},
        "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"}],
    }
    worker = {
        **container,
        "name": "ray-worker",
        "resources": {
            "limits": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
            "requests": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
        },
    }
    spec: dict[str, Any] = {
        "schedule": schedule.cron,
        "timeZone": schedule.timezone,
        "suspend": not schedule.enabled,
        "jobTemplate": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0"},
                    "template": {"spec": {"containers": [head]}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu",
                        "replicas": gpu_workers,
                        "minReplicas": gpu_workers,
                        "maxReplicas": max(gpu_workers, 1),
                        "rayStartParams": {},
                        "template": {
                            "spec": {
                                "containers": [worker],
                                "tolerations": [
                                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                                ],
                            }
                        },
                    }
                ],
            },
        },
    }
    if schedule.concurrency != "allow":
        spec["concurrencyPolicy"] = schedule.concurrency.capitalize()
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {
            "name": f"cmflow-{schedule.id}",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "cmflow", "cmflow.io/schedule": schedule.id},
        },
        "spec": spec,
    }
