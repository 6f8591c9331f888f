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


def explain(current: dict[str, Any], previous: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """Rows (component, value, 'same' | 'changed' | 'new') comparing two sets of key components."""
    rows: list[tuple[str, str, str]] = []
    for name, value in current.items():
        if name == "params" and isinstance(value, dict):
            old_params = (previous or {}).get("params", {}) or {}
            for param, pvalue in value.items():
                status = _status(previous, param in old_params and old_params[param] == pvalue)
                rows.append((f"params.{param}", _short(pvalue), status))
            for param in sorted(set(old_params) - set(value)):
                rows.append((f"params.{param}", "(removed)", "changed"))
            continue
        if name == "inputs" and isinstance(value, dict):
            old_inputs = (previous or {}).get("inputs", {}) or {}
            for input_name, digest in value.items():
                rows.append(
                    (
                        f"inputs.{input_name}",
                        digest[:16],
                        _status(previous, old_inputs.get(input_name) == digest),
                    )
                )
            continue
        same = previous is not None and previous.get(name) == value
        rows.append((name, _short(value), _status(previous, same)))
    return rows


def _status(previous: dict[str, Any] | None, same: bool) -> str:
    if previous is None:
        return "new"
    return "same" if same else "changed"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return text if len(text) <= 64 else text[:61] + "..."
