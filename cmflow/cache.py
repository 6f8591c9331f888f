"""Stage cache keys, hit verification and explanations.

key = sha256(canonical JSON of {schema, kind, stage version, user cache version, code fingerprint,
params minus the ignore list, pipeline seed, {input: manifest digest}}).

A hit counts only when the manifest exists, parses, matches the key and every file it lists is present
and intact (:meth:`cmflow.storage.Storage.verify`). Anything else is a miss: the stage re-runs, and a
broken manifest is moved aside so the recompute can commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cmflow.stage import StageDef
from cmflow.storage import Manifest, Storage, canonical_json, sha256_bytes

KEY_SCHEMA = 1


def key_components(
    definition: StageDef,
    params: dict[str, Any],
    *,
    cache_version: str,
    ignore: list[str] | tuple[str, ...],
    input_digests: dict[str, str],
    seed: int,
) -> dict[str, Any]:
    dropped = set(definition.cache_ignore) | set(ignore)
    return {
        "schema": KEY_SCHEMA,
        "kind": definition.kind,
        "stage_version": definition.version,
        "cache_version": cache_version,
        "code": definition.code_fingerprint(),
        "params": {k: v for k, v in sorted(params.items()) if k not in dropped},
        "seed": seed,
        "inputs": dict(sorted(input_digests.items())),
    }


def cache_key(components: dict[str, Any]) -> str:
    return sha256_bytes(canonical_json(components).encode())


@dataclass(frozen=True)
class Lookup:
    hit: bool
    manifest: Manifest | None
    reason: str  # why it is a miss ("" for a hit)


def lookup(storage: Storage, kind: str, key: str, *, repair: bool = True) -> Lookup:
    """Check for a verified committed artifact under ``key``; move a broken manifest aside if ``repair``."""
    try:
        manifest = storage.load_manifest(kind, key)
    except ValueError as exc:
        if repair:
            storage.quarantine(kind, key, f"unreadable manifest: {exc}")
        return Lookup(False, None, f"manifest unreadable ({exc})")
    if manifest is None:
        return Lookup(False, None, "not computed before")
    problem = storage.verify(manifest, key)
    if problem:
        if repair:
            storage.quarantine(kind, key, problem)
        return Lookup(False, None, problem)
    return Lookup(True, manifest, "")


@dataclass(frozen=True)
class Difference:
    """One leaf of the key components compared with the previous run's: ``same``, ``changed``, ``new`` or
    ``removed`` (``previous`` / ``value`` are None where a side has no such component)."""

    component: str  # dotted path, e.g. "params.lr", "code.modules.cmflow.data.images"
    status: str
    value: Any
    previous: Any


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def explain(current: dict[str, Any], previous: dict[str, Any] | None) -> list[Difference]:
    """Every leaf of ``current`` (and every leaf only ``previous`` has) with its status against ``previous``.

    Nested components are compared leaf by leaf, so a changed code fingerprint names the module, data file
    or library version that changed rather than the whole fingerprint.
    """
    now = _leaves(current)
    if previous is None:
        return [Difference(name, "new", value, None) for name, value in now.items()]
    before = _leaves(previous)
    rows = []
    for name, value in now.items():
        if name not in before:
            rows.append(Difference(name, "new", value, None))
        else:
            rows.append(Difference(name, "same" if before[name] == value else "changed", value, before[name]))
    rows.extend(Difference(name, "removed", None, before[name]) for name in before if name not in now)
    return rows


def short(value: Any) -> str:
    """A value as at most 64 characters (digests shortened to 16 hex digits)."""
    if value is None:
        return "-"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:16]
    return _short(value)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return text if len(text) <= 64 else text[:61] + "..."
