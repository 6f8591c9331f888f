"""Garbage collection of a storage root: what no committed manifest can ever reach again.

Artifacts are write-once and found only through ``manifest.json`` (:mod:`cmflow.storage`), so two kinds
of leftovers accumulate and are safe to remove:

* **unreferenced attempts** -- ``artifacts/<kind>/<xx>/<key>/attempts/<attempt>`` other than the one the
  key's manifest names: the upload of a crashed or killed stage, the attempt behind a quarantined
  (broken) manifest, a race loser that could not clean up. An attempt of a key with *no* manifest may
  belong to a commit in progress, so attempts are removed only when their name's UTC timestamp is older
  than ``min_age_s``.
* **finished work folders** -- ``work/<kind>/<key>`` (training checkpoints, kept for resume) of a key
  whose artifact is committed: nothing resumes a committed key. Work of uncommitted keys is kept.

Manifests, the attempts they name, quarantine notes and run records are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from cmflow.storage import Storage

__all__ = ["Garbage", "collect", "find_garbage"]


Reason = Literal["unreferenced attempt", "work of a committed key"]


@dataclass(frozen=True)
class Garbage:
    """One removable folder: its key under the root, why it is garbage, and its size in bytes."""

    key: str
    reason: Reason
    size: int


def _attempt_time(name: str) -> datetime | None:
    try:
        return datetime.strptime(name.split("-", 1)[0], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _garbage(storage: Storage, key: str, reason: Reason) -> Garbage:
    try:
        size = int(storage.fs.du(storage.path(key), total=True))
    except FileNotFoundError:
        size = 0
    return Garbage(key, reason, size)


def find_garbage(
    storage: Storage, *, min_age_s: float = 3600.0, now: datetime | None = None
) -> list[Garbage]:
    """Every removable folder under ``storage`` (see the module docstring); reads only."""
    now = now or datetime.now(timezone.utc)
    found: list[Garbage] = []
    committed: set[tuple[str, str]] = set()
    for kind in storage.list("artifacts"):
        for shard in storage.list(f"artifacts/{kind}"):
            for key in storage.list(f"artifacts/{kind}/{shard}"):
                prefix = f"artifacts/{kind}/{shard}/{key}"
                try:
                    manifest = storage.load_manifest(kind, key)
                except ValueError:
                    continue  # unparsable: the next run quarantines it; keep everything until then
                if manifest is not None:
                    committed.add((kind, key))
                for attempt in storage.list(f"{prefix}/attempts"):
                    if manifest is not None and attempt == manifest.attempt:
                        continue
                    started = _attempt_time(attempt)
                    if manifest is None and (started is None or (now - started).total_seconds() < min_age_s):
                        continue  # possibly a commit in progress
                    found.append(_garbage(storage, f"{prefix}/attempts/{attempt}", "unreferenced attempt"))
    for kind in storage.list("work"):
        for key in storage.list(f"work/{kind}"):
            if (kind, key) in committed:
                found.append(_garbage(storage, f"work/{kind}/{key}", "work of a committed key"))
    return found


def collect(storage: Storage, garbage: list[Garbage]) -> int:
    """Delete ``garbage`` (from :func:`find_garbage`); returns the bytes freed."""
    for item in garbage:
        storage.delete(item.key, recursive=True)
    return sum(item.size for item in garbage)
