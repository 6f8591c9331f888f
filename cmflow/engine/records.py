"""The durable run record: ``runs/<run_id>/run.json`` under the storage root.

The driver is its only writer. It holds the redacted spec snapshot and, per stage, the status, cache key
and its components, hit or miss (and why), the manifest URI, timings and the error. ``cmflow status``
reads it after the driver is gone, and ``cmflow resume`` re-runs its spec: finished stages are hits.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from cmflow.errors import UsageError
from cmflow.storage import Storage

RUN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")
FINAL = {"succeeded", "failed", "stopped"}


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_run_id(pipeline: str) -> str:
    return f"{pipeline}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise UsageError(f"run id {run_id!r} is not valid; use lowercase letters, digits, '.', '_' or '-'")
    return run_id


@dataclass
class StageRecord:
    kind: str
    status: str = "pending"  # pending | running | hit | done | failed | stopped | skipped
    cache_key: str = ""
    components: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # why it ran (the miss reason) or why it was skipped
    manifest_uri: str = ""
    manifest_digest: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    ended_at: str = ""
    seconds: float = 0.0
    error: str = ""
    traceback: str = ""
    node_id: str = ""  # the Ray node the stage's task ran on
    timings: dict[str, float] = field(default_factory=dict)  # img/s, seconds per phase: never in artifacts


@dataclass
class RunRecord:
    run_id: str
    pipeline: str
    spec: dict[str, Any]
    status: str = "running"
    created_at: str = field(default_factory=utcnow)
    updated_at: str = field(default_factory=utcnow)
    driver: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    attempts: int = 1
    error: str = ""
    tracking: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, run_id: str, spec_snapshot: dict[str, Any], kinds: dict[str, str]) -> RunRecord:
        return cls(
            run_id=run_id,
            pipeline=spec_snapshot["name"],
            spec=spec_snapshot,
            driver={"host": socket.gethostname(), "pid": os.getpid()},
            stages={name: StageRecord(kind=kind) for name, kind in kinds.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def driver_gone(self) -> bool:
        """True when the record says running but its driver process (on this host) no longer exists."""
        if self.status != "running" or self.driver.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(self.driver.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        stages = {name: StageRecord(**value) for name, value in data.pop("stages", {}).items()}
        return cls(**data, stages=stages)

    def save(self, storage: Storage) -> None:
        self.updated_at = utcnow()
        storage.write_json(f"runs/{self.run_id}/run.json", self.to_dict())

    @classmethod
    def load(cls, storage: Storage, run_id: str) -> RunRecord:
        check_run_id(run_id)
        key = f"runs/{run_id}/run.json"
        try:
            data = storage.read_json(key)
        except FileNotFoundError:
            raise UsageError(
                f"no run {run_id!r} under {storage.uri()}; list runs with `cmflow runs list --root ROOT`"
            ) from None
        except ValueError as exc:  # not JSON (JSONDecodeError, UnicodeDecodeError)
            raise UnreadableRecord(storage, key, f"not JSON: {str(exc).splitlines()[0][:120]}") from None
        try:
            if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
                raise TypeError(f"a JSON {type(data).__name__}, not a run record")
            record = cls.from_dict(dict(data))
        except (TypeError, KeyError, ValueError, AttributeError) as exc:  # a foreign or damaged record
            raise UnreadableRecord(storage, key, f"not a cmflow run record: {str(exc)[:120]}") from None
        if record.run_id != run_id:
            raise UnreadableRecord(storage, key, f"it names run {record.run_id!r}")
        return record


class UnreadableRecord(UsageError):
    """A ``run.json`` that does not parse or is not a cmflow run record."""

    def __init__(self, storage: Storage, key: str, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"{storage.uri(key)} is unreadable ({reason}); restore it from a backup or move it aside "
            "(the run's artifacts stay cached: `cmflow run SPEC` reuses them)"
        )


def list_runs(storage: Storage, unreadable: list[tuple[str, str]] | None = None) -> list[RunRecord]:
    """The readable run records, oldest first; ``unreadable`` (if given) collects (run id, why) of the rest."""
    runs = []
    for run_id in storage.list("runs"):
        try:
            runs.append(RunRecord.load(storage, run_id))
        except UnreadableRecord as exc:
            if unreadable is not None:
                unreadable.append((run_id, exc.reason))
        except UsageError:  # not a run id, or no run.json yet (a submission not started)
            continue
    return sorted(runs, key=lambda r: r.created_at)


def previous_stage_record(storage: Storage, run: RunRecord, stage: str) -> tuple[str, StageRecord] | None:
    """(run id, record) of the same stage in the latest earlier run of the pipeline that computed its key."""
    earlier = [r for r in list_runs(storage) if r.pipeline == run.pipeline and r.created_at < run.created_at]
    for other in reversed(earlier):
        record = other.stages.get(stage)
        if record and record.components:
            return other.run_id, record
    return None
