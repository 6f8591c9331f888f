"""Cron maths: the UTC instants at which a five-field cron expression fires in a time zone.

Cron times are local wall-clock times. A wall time that does not exist (spring forward) fires once, at the
first valid instant after the gap; a wall time that exists twice (fall back) fires once, at its first
occurrence. No storage, no clock: every function takes the times it needs.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cmflow.errors import UsageError

UTC = timezone.utc
CRON_EXAMPLE = "e.g. '0 3 * * 1' is Mondays at 03:00"


def check_cron(value: str) -> str:
    """A normalised cron expression; ValueError (one line, with the fix) when it is not five valid fields."""
    from croniter import croniter

    value = " ".join(value.split())
    if not value.startswith("@") and len(value.split()) != 5:
        raise ValueError(f"cron {value!r} must have 5 fields (minute hour day month weekday); {CRON_EXAMPLE}")
    if not croniter.is_valid(value):
        raise ValueError(f"cron {value!r} is not valid; {CRON_EXAMPLE}")
    return value


def check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"time zone {value!r} is unknown; use an IANA name like Europe/Paris") from None
    return value


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
