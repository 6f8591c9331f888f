"""The schedule store: the :class:`Schedule` model, its state and its markers, under the storage root.

Layout::

    schedules/<id>/schedule.json            the schedule: spec snapshot, cron, time zone, policies, enabled
    schedules/<id>/state.json               cursor, last run, last digest, retries (rebuilt from markers)
    schedules/<id>/ticks/<fire>.json        one create-only marker per cron fire time (UTC, 20260302T020000Z)
    schedules/<id>/triggers/<digest>.json   one create-only marker per dataset-manifest digest (trigger-only)

Also the digest of a data trigger's manifest (:func:`read_manifest_digest`) and the status of a schedule's
last run as its run record tells it (:func:`last_run_status`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cmflow.errors import CmflowError, InputError, SpecError, UsageError
from cmflow.schedule.cron import (
    UTC,
    check_cron,
    check_timezone,
    due_fire_times,
    iso,
    next_fire_time,
    parse_time,
)
from cmflow.storage import Storage, open_uri

MAX_ATTEMPTS = 3
SCHEDULE_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")


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
                f"schedule id {value!r} is not valid; use 1-40 lowercase letters, digits or '-', starting "
                "with a letter (--id)"
            )
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return check_timezone(value)

    @model_validator(mode="after")
    def _cron_or_trigger(self) -> Schedule:
        if self.cron is None and self.trigger is None:
            raise ValueError(
                "a schedule needs a cron expression, a trigger manifest, or both; pass --cron and/or "
                "--trigger-manifest"
            )
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


def _schedule_key(schedule_id: str) -> str:
    return f"schedules/{schedule_id}/schedule.json"


def _state_key(schedule_id: str) -> str:
    return f"schedules/{schedule_id}/state.json"


def _validate(data: dict[str, Any], source: str | None = None) -> Schedule:
    """A :class:`Schedule`, or one :class:`SpecError` line: the problem and its fix, prefixed once.

    Own validators write the whole line (``cron '61 * * *' must have 5 fields ...; e.g. ...``); pydantic's
    messages get the field name. ``source`` (a stored file) is prefixed; a new schedule has none.
    """
    try:
        return Schedule.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error":
            where = ".".join(str(p) for p in err["loc"]) or "schedule"
            message = f"{where}: {message}; see `cmflow schedule create --help`"
        raise SpecError(f"{source}: {message}" if source else message) from None


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
        write_state(storage, schedule, state)
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


def write_state(storage: Storage, schedule: Schedule, state: ScheduleState) -> None:
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


def last_run_status(schedule: Schedule, state: ScheduleState) -> str | None:
    """The status in the last submitted run's record (``runs/<id>/run.json`` under the spec's storage root).

    ``submitted`` while the run has no record yet (its job is queued or its driver has not started),
    ``unknown`` when the record cannot be read, None when the schedule has not submitted a run.
    """
    if not state.last_run_id:
        return None
    storage_spec = schedule.spec.get("storage") or {}
    try:
        runs = Storage(str(storage_spec["root"]), dict(storage_spec.get("options") or {}))
        record = runs.read_json(f"runs/{state.last_run_id}/run.json")
    except FileNotFoundError:
        return "submitted"
    except (CmflowError, KeyError, ValueError, OSError):
        return "unknown"
    status = record.get("status") if isinstance(record, dict) else None
    return str(status) if status else "unknown"


def upcoming(
    schedule: Schedule, state: ScheduleState, now: datetime
) -> tuple[datetime | None, datetime | None]:
    """(overdue, next) for a cron schedule: the newest fire time a tick at ``now`` would still fire (None if
    none), and the first fire time after both ``now`` and the cursor (times at or before the cursor are
    settled, so they never fire again). (None, None) for a disabled or trigger-only schedule.
    """
    if not schedule.cron or not schedule.enabled:
        return None, None
    cursor = parse_time(state.cursor or schedule.created_at)
    overdue = None
    if cursor < now:
        due = due_fire_times(schedule.cron, schedule.tz, cursor, now, 1)
        if due and (
            schedule.catchup != "none" or (now - due[-1]).total_seconds() <= schedule.starting_deadline_s
        ):
            overdue = due[-1]
    return overdue, next_fire_time(schedule.cron, schedule.tz, max(now, cursor))
