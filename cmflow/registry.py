"""The MLflow model registry: register versions, decide promotions, move aliases safely, roll back.

Promotion is a pure decision (:func:`decide_promotion`) plus one side effect (:func:`promote`) that moves
the ``champion`` alias with optimistic concurrency. Registry *stages* are never used (deprecated since
MLflow 2.9): only aliases (``challenger``, ``champion``) and version tags.

Version tags written by :func:`register_version` and the promote step::

    cmflow.run_id, cmflow.cache_key, cmflow.stage_run_id, cmflow.model_digest, cmflow.dataset_digest,
    cmflow.ref_stats_digest, fid_1step / fid_2step / fid_teacher / nfe_* (the evaluate report's numbers),
    cmflow.gate (JSON: the gate the version was registered under, :class:`Gate`),
    cmflow.validation_status (pending | passed | failed | forced), cmflow.gate_report (JSON),
    cmflow.forced_reason (why a version that failed its gate was promoted with ``force``),
    cmflow.previous_champion (the version that was champion when this one was promoted)

One gate: the ``register`` stage records its gate on the version (``cmflow.gate``), and both the
``promote`` stage and ``cmflow models promote`` apply that gate. ``force`` promotes past a failed gate
only with a reason, and the version is tagged ``forced``, never ``passed``.

Lower metric values are better (FID, KID). All functions take an explicit ``MlflowClient`` (no global
tracking URI, no fluent active run); :func:`cmflow.mlflow_client.client_for` builds one.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from cmflow.errors import GateRejected, RegistryError, UsageError
from cmflow.mlflow_client import client_for

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_TAG = "cmflow.previous_champion"
STATUS_TAG = "cmflow.validation_status"
GATE_TAG = "cmflow.gate_report"
GATE_SPEC_TAG = "cmflow.gate"
FORCED_REASON_TAG = "cmflow.forced_reason"
TICKET_TAG = "cmflow.ticket_for"
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
METRIC_PREFIXES = ("fid", "kid", "nfe", "precision", "recall", "ratio", "midpoint_sigma", "num_samples")
IMPLIED_NFE = {"fid_1step": ("nfe_1step", 1.0), "fid_2step": ("nfe_2step", 2.0)}  # CM sampling: NFE = steps
STALE_TICKET_S = 60.0  # a ticket whose winner has not applied it after this long is rolled forward


# --------------------------------------------------------------------------------------------------
# Clients and URIs


def check_model_name(name: str) -> str:
    if not MODEL_NAME_RE.match(name) or ".cmflow-lock." in name:
        raise UsageError(
            f"model name {name!r} must be 1-200 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit"
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias):
        raise UsageError(f"alias {alias!r} must be a letter then up to 62 letters, digits, '_' or '-'")
    return alias


def _exists(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in {"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"}


def registry_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the client; MLflow errors become a one-line :class:`RegistryError`."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        raise RegistryError(f"{what}: {exc.message.splitlines()[0]}; see `cmflow models list`") from None


@dataclass(frozen=True)
class ResolvedModel:
    name: str | None
    version: str | None
    source: str  # the artifact location to download


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/3`` -> (NAME, "3", None).

    ``models:/m-<id>`` (a logged model) -> ("m-<id>", None, None).
    """
    if not uri.startswith("models:/"):
        raise UsageError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
    path = uri[len("models:/") :].strip("/")
    if "@" in path:
        name, alias = path.split("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    elif "/" in path:
        name, version = path.split("/", 1)
        if name and version.isdigit():
            return name, version, None
    elif path:
        return path, None, None
    raise UsageError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")


def resolve_model_uri(client: Any, uri: str) -> ResolvedModel:
    """Resolve a ``models:/`` URI through ``client`` (MLflow itself would use the global registry URI)."""
    if not uri.startswith("models:/"):
        return ResolvedModel(None, None, uri)  # a local path or artifact URI
    name, version, alias = parse_model_uri(uri)
    if version is None and alias is None:
        model = registry_call(f"no logged model {name}", client.get_logged_model, name)
        return ResolvedModel(None, None, model.artifact_location)
    if alias is not None:
        mv = registry_call(
            f"model {name!r} has no alias {alias!r}", client.get_model_version_by_alias, name, alias
        )
        version = mv.version
    source = registry_call(
        f"no version {version} of {name!r}", client.get_model_version_download_uri, name, version
    )
    return ResolvedModel(name, str(version), source)


# --------------------------------------------------------------------------------------------------
# Registering


def report_metrics(meta: Mapping[str, Any]) -> dict[str, float]:
    """The gate numbers of an evaluate report's meta: finite FID/KID/NFE/precision/recall values.

    ``nfe_1step`` / ``nfe_2step`` default to 1 / 2 when the report gives the FID but not the NFE.
    """
    found: dict[str, float] = {}
    for key, value in meta.items():
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
            and str(key).lower().startswith(METRIC_PREFIXES)
        ):
            found[str(key)] = float(value)
    for fid, (nfe, value) in IMPLIED_NFE.items():
        if fid in found:
            found.setdefault(nfe, value)
    return found


def register_version(
    client: Any,
    *,
    name: str,
    run_id: str,
    experiment_id: str,
    weights: str | Path,
    config: str | Path,
    tags: Mapping[str, str],
    alias: str | None = CHALLENGER,
    dedupe_tag: str = "cmflow.cache_key",
    description: str = "",
) -> Any:
    """Log the pyfunc model in ``run_id``, register it as a new version of ``name``, tag it, set ``alias``.

    Idempotent per ``tags[dedupe_tag]``: if a version with that tag exists (a retried or uncached rerun of
    the same stage), it is reused instead of registering a duplicate.
    """
    from cmflow.serving import log_pyfunc

    check_model_name(name)
    tags = {k: str(v) for k, v in tags.items()}
    try:
        client.create_registered_model(name, description=description or "cmflow consistency model")
    except Exception as exc:  # noqa: BLE001 - MlflowException; an existing model is fine
        if not _exists(exc):
            raise RegistryError(f"cannot create registered model {name!r}: {exc}") from None
    existing = _find_version(client, name, dedupe_tag, tags.get(dedupe_tag))
    if existing is None:
        logged = log_pyfunc(
            client, run_id=run_id, experiment_id=experiment_id, name=name, weights=weights, config=config
        )
        existing = registry_call(
            f"cannot register a version of {name!r}",
            client.create_model_version,
            name,
            logged.artifact_location,
            run_id=run_id,
            tags={**tags, STATUS_TAG: "pending"},
            model_id=logged.model_id,
            description=description or None,
        )
    else:  # keep the lineage of the attempt that logged it; add what it lacked
        for key, value in tags.items():
            if key not in (existing.tags or {}):
                client.set_model_version_tag(name, existing.version, key, value)
    if alias:
        registry_call(
            f"cannot set alias {alias}", client.set_registered_model_alias, name, alias, existing.version
        )
    return client.get_model_version(name, existing.version)


def _find_version(client: Any, name: str, tag: str, value: str | None) -> Any:
    if not value:
        return None
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'", max_results=5)
    except Exception:  # noqa: BLE001 - a store without tag search: register anew
        return None
    found = sorted(found, key=lambda mv: int(mv.version))
    return found[0] if found else None


# --------------------------------------------------------------------------------------------------
# The decision (pure)


@dataclass(frozen=True)
class Candidate:
    """A model version as the gate sees it."""

    version: str
    metrics: dict[str, float] = field(default_factory=dict)
    ref_stats_digest: str | None = None


@dataclass(frozen=True)
class Gate:
    """The promotion rule: absolute bound and tolerance relative to the champion (lower is better)."""

    metric: str = "fid_1step"
    max_fid: float | None = None  # absolute: the candidate's metric must be <= this
    tolerance: float = 0.0  # relative: candidate <= champion * (1 + tolerance)
    policy: Literal["auto", "manual"] = "auto"

    def to_tag(self) -> str:
        """The ``cmflow.gate`` tag value (the policy is the promoter's, not the version's)."""
        return json.dumps(
            {"metric": self.metric, "max_fid": self.max_fid, "tolerance": self.tolerance}, sort_keys=True
        )

    def describe(self) -> str:
        """``fid_1step <= 20, <= champion x (1 + 0.05)``."""
        parts = [f"{self.metric} <= {self.max_fid:g}" if self.max_fid is not None else self.metric]
        parts.append(f"<= champion x (1 + {self.tolerance:g})")
        return ", ".join(parts)


def gate_of(mv: Any) -> Gate | None:
    """The gate a model version was registered under (its ``cmflow.gate`` tag), or None."""
    text = (mv.tags or {}).get(GATE_SPEC_TAG)
    if not text:
        return None
    try:
        data = json.loads(text)
        max_fid = data.get("max_fid")
        return Gate(
            metric=str(data["metric"]),
            max_fid=None if max_fid is None else float(max_fid),
            tolerance=float(data.get("tolerance") or 0.0),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RegistryError(
            f"v{mv.version} of {mv.name!r} has a malformed {GATE_SPEC_TAG} tag {text[:60]!r}; fix the tag "
            "or promote with --force --reason"
        ) from None


@dataclass(frozen=True)
class Decision:
    action: Literal["promote", "reject", "hold", "noop"]  # hold: passed, but the policy is manual
    reason: str
    metric: str = ""
    candidate_value: float | None = None
    champion_value: float | None = None
    threshold: float | None = None
    forced: bool = False  # promoted although the gate said reject or hold

    @property
    def passed(self) -> bool:
        return self.action in {"promote", "hold"} and not self.forced


def decide_promotion(candidate: Candidate, champion: Candidate | None, gate: Gate) -> Decision:
    """Apply ``gate`` to ``candidate`` against the current ``champion`` (None: no champion yet)."""
    metric = gate.metric
    if champion is not None and champion.version == candidate.version:
        return Decision("noop", f"version {candidate.version} is already the champion", metric)
    value = candidate.metrics.get(metric)
    if value is None or not math.isfinite(value):
        return Decision(
            "reject",
            f"version {candidate.version} has no finite {metric} (evaluate it first)",
            metric,
        )
    if gate.max_fid is not None and value > gate.max_fid:
        return Decision(
            "reject", f"{metric} {value:.4g} > max_fid {gate.max_fid:.4g}", metric, value, None, gate.max_fid
        )
    if champion is None:
        return _passed(
            gate, f"no champion yet and {metric} {value:.4g} passes the absolute gate", metric, value
        )
    best = champion.metrics.get(metric)
    if best is None or not math.isfinite(best):
        return Decision(
            "reject",
            f"champion v{champion.version} has no finite {metric} to compare with",
            metric,
            value,
        )
    if (
        candidate.ref_stats_digest
        and champion.ref_stats_digest
        and (candidate.ref_stats_digest != champion.ref_stats_digest)
    ):
        return Decision(
            "reject",
            f"{metric} of v{candidate.version} and champion v{champion.version} use different "
            "reference statistics (re-evaluate on the same reference)",
            metric,
            value,
            best,
        )
    threshold = best * (1 + gate.tolerance)
    if value > threshold:
        return Decision(
            "reject",
            f"{metric} {value:.4g} > champion v{champion.version}'s {best:.4g} x (1 + "
            f"{gate.tolerance:g}) = {threshold:.4g}",
            metric,
            value,
            best,
            threshold,
        )
    reason = f"{metric} {value:.4g} <= champion v{champion.version}'s {best:.4g} x (1 + {gate.tolerance:g})"
    return _passed(gate, reason, metric, value, best, threshold)


def _passed(
    gate: Gate,
    reason: str,
    metric: str,
    value: float,
    best: float | None = None,
    threshold: float | None = None,
) -> Decision:
    if gate.policy == "manual":
        return Decision(
            "hold",
            f"{reason}; policy is manual: promote it with `cmflow models promote`",
            metric,
            value,
            best,
            threshold,
        )
    return Decision("promote", reason, metric, value, best, threshold)


def candidate_of(mv: Any) -> Candidate:
    """A registry ModelVersion as a :class:`Candidate` (metrics from its tags)."""
    metrics: dict[str, float] = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith("cmflow."):
            continue
        try:
            metrics[key] = float(value)
        except (TypeError, ValueError):
            continue
    return Candidate(str(mv.version), metrics, (mv.tags or {}).get("cmflow.ref_stats_digest"))


# --------------------------------------------------------------------------------------------------
# Moving the alias (side effect, optimistic concurrency)


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` / :func:`rollback` did."""

    model_name: str
    version: str
    outcome: Literal["promoted", "rejected", "held", "noop", "lost_race", "rolled_back"]
    decision: Decision
    champion_before: str | None
    champion_after: str | None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _State:
    champion: str | None  # the version the alias points at
    generation: int  # how many times the alias has moved (a registered-model tag)


def _generation_tag(alias: str) -> str:
    return f"cmflow.{alias}_generation"


def ticket_name(name: str, alias: str, generation: int) -> str:
    return f"{name}.cmflow-lock.{alias}.{generation}"


def _state(client: Any, name: str, alias: str) -> _State:
    model = registry_call(f"no registered model {name!r}", client.get_registered_model, name)
    version = (model.aliases or {}).get(alias)
    return _State(
        str(version) if version is not None else None, int(model.tags.get(_generation_tag(alias), 0))
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _take_ticket(client: Any, name: str, alias: str, state: _State, to_version: str, action: str) -> bool:
    """Create-once the ticket for move ``generation + 1``; True if this caller won it.

    ``create_registered_model`` is atomic on every MLflow store (the name is the primary key), so of all
    callers that read the same generation exactly one creates the ticket. The caller then re-reads the
    generation: a ticket for an old generation (recreated after its clean-up) is refused.
    """
    target = state.generation + 1
    tags = {
        TICKET_TAG: name,
        "cmflow.alias": alias,
        "cmflow.from": state.champion or "",
        "cmflow.to": to_version,
        "cmflow.action": action,
        "cmflow.by": f"{socket.gethostname()}:{os.getpid()}",
        "cmflow.at": _now(),
    }
    try:
        client.create_registered_model(
            ticket_name(name, alias, target),
            tags=tags,
            description=f"cmflow promotion ticket for {name}; ignore",
        )
    except Exception as exc:  # noqa: BLE001 - MlflowException
        if _exists(exc):
            return False
        raise RegistryError(f"cannot create the promotion ticket of {name!r}: {exc}") from None
    if _state(client, name, alias).generation != state.generation:
        _delete_quietly(client, ticket_name(name, alias, target))
        return False
    return True


def _apply(
    client: Any,
    name: str,
    alias: str,
    generation: int,
    from_version: str | None,
    to_version: str,
    action: str,
) -> None:
    """Move the alias (after winning ticket ``generation``): tags first, then the alias, then the counter."""
    if action == "promote":
        client.set_model_version_tag(name, to_version, PREVIOUS_TAG, from_version or "")
        client.set_model_version_tag(name, to_version, "cmflow.promoted_at", _now())
    elif from_version:
        client.set_model_version_tag(name, from_version, "cmflow.rolled_back_at", _now())
    client.set_registered_model_alias(name, alias, to_version)
    client.set_registered_model_tag(name, _generation_tag(alias), str(generation))
    if generation > 1:
        _delete_quietly(client, ticket_name(name, alias, generation - 1))


def _delete_quietly(client: Any, name: str) -> None:
    try:
        client.delete_registered_model(name)
    except Exception:  # noqa: BLE001 - housekeeping only
        pass


def _recover(client: Any, name: str, alias: str, state: _State, stale_after_s: float) -> str:
    """If ticket ``generation + 1`` was taken but never applied (its owner died), roll it forward."""
    ticket = ticket_name(name, alias, state.generation + 1)
    try:
        model = client.get_registered_model(ticket)
    except Exception:  # noqa: BLE001 - gone: its owner finished and cleaned up
        return ""
    age_s = time.time() - (model.creation_timestamp or 0) / 1000
    if age_s < stale_after_s or _state(client, name, alias) != state:
        return ""
    to_version = model.tags.get("cmflow.to", "")
    action = "promote" if model.tags.get("cmflow.action") == "promote" else "rollback"
    if to_version:
        _apply(client, name, alias, state.generation + 1, state.champion, to_version, action)
    return f"; rolled forward an unfinished move to v{to_version} (ticket {ticket}, {age_s:.0f} s old)"


def _move(
    client: Any, name: str, alias: str, seen: _State, to_version: str, action: str, stale_after_s: float
) -> tuple[bool, str]:
    """Compare-and-set the alias from ``seen`` to ``to_version``; (won, message)."""
    current = _state(client, name, alias)  # re-read just before moving
    if current != seen:
        return (
            False,
            f"{alias} moved from {seen.champion} to {current.champion} while deciding; run promote again",
        )
    if _take_ticket(client, name, alias, seen, to_version, action):
        _apply(client, name, alias, seen.generation + 1, seen.champion, to_version, action)
        return True, ""
    recovered = _recover(client, name, alias, seen, stale_after_s)
    after = _state(client, name, alias).champion
    return False, f"another promoter moved {alias} first (now v{after}){recovered}; run promote again"


def promote(
    client: Any,
    name: str,
    version: str | int,
    gate: Gate | None = None,
    *,
    policy: Literal["auto", "manual"] = "auto",
    force: bool = False,
    reason: str = "",
    alias: str = CHAMPION,
    stale_after_s: float = STALE_TICKET_S,
) -> Promotion:
    """Gate ``version`` against the current ``alias`` holder and, if it passes, make it the holder.

    How exactly one of several concurrent promoters wins: every move of the alias has a generation number
    ``g`` (a registered-model tag). A promoter reads (alias, g), decides, re-reads (alias, g) just before
    moving and aborts if either changed, then *creates* the registered model
    ``NAME.cmflow-lock.ALIAS.<g+1>`` (the ticket). MLflow's stores create a name at most once (primary
    key), so among promoters that read the same g exactly one creates it; the others get
    RESOURCE_ALREADY_EXISTS and report ``lost_race``. The winner re-reads g (a stale promoter recreating
    an old, cleaned-up ticket is refused here, since g only grows), then tags the version, moves the
    alias and only then sets g+1 — so anyone who sees the new g also sees the new alias. If a winner dies
    between the ticket and the alias move, the next promoter rolls that move forward once the ticket is
    ``stale_after_s`` old. ``force`` skips the gate, not the concurrency control.

    The gate is the one the version was registered under (``cmflow.gate``); ``gate`` is used only for a
    version registered without one, and a ``gate`` that differs from the recorded one is refused.
    ``force`` needs a ``reason``; a version promoted past its gate is tagged ``forced`` with the reason.
    """
    check_model_name(name)
    check_alias(alias)
    version = str(version)
    if force and not reason.strip():
        raise UsageError(
            f'--force needs a reason; add --reason "why v{version} may skip its gate" '
            "(it is recorded on the version)"
        )
    mv = registry_call(f"no version {version} of {name!r}", client.get_model_version, name, version)
    recorded = gate_of(mv)
    if recorded is not None and gate is not None and replace(gate, policy="auto") != recorded:
        raise UsageError(
            f"v{version} of {name!r} was registered under the gate {recorded.describe()}, which is the one "
            "promote applies; drop --metric/--max-fid/--tolerance, or promote past it with --force --reason"
        )
    gate = replace(recorded or gate or Gate(), policy=policy)
    seen = _state(client, name, alias)
    champion = None
    if seen.champion is not None:
        champion = candidate_of(client.get_model_version(name, seen.champion))
    decision = decide_promotion(candidate_of(mv), champion, gate)
    if force and decision.action in {"reject", "hold"}:
        decision = Decision(
            "promote",
            f"forced: {reason.strip()} (the gate said: {decision.reason})",
            decision.metric,
            decision.candidate_value,
            decision.champion_value,
            decision.threshold,
            forced=True,
        )
    _record_gate(client, name, version, decision, reason.strip())
    if decision.action != "promote":
        outcome = {"reject": "rejected", "hold": "held", "noop": "noop"}[decision.action]
        return Promotion(name, version, outcome, decision, seen.champion, seen.champion, decision.reason)
    won, message = _move(client, name, alias, seen, version, "promote", stale_after_s)
    after = _state(client, name, alias).champion
    if not won:
        return Promotion(name, version, "lost_race", decision, seen.champion, after, message)
    return Promotion(name, version, "promoted", decision, seen.champion, after, decision.reason)


def _record_gate(client: Any, name: str, version: str, decision: Decision, reason: str = "") -> None:
    if decision.action == "noop":
        return
    if decision.forced:
        client.set_model_version_tag(name, version, STATUS_TAG, "forced")
        client.set_model_version_tag(name, version, FORCED_REASON_TAG, reason[:5000])
    else:
        client.set_model_version_tag(name, version, STATUS_TAG, "passed" if decision.passed else "failed")
    report = json.dumps({k: v for k, v in asdict(decision).items() if v is not None}, sort_keys=True)
    client.set_model_version_tag(name, version, GATE_TAG, report[:5000])


def rollback(
    client: Any, name: str, *, alias: str = CHAMPION, stale_after_s: float = STALE_TICKET_S
) -> Promotion:
    """Move ``alias`` back to the version recorded as the current holder's previous champion."""
    check_model_name(name)
    check_alias(alias)
    seen = _state(client, name, alias)
    if seen.champion is None:
        raise RegistryError(f"model {name!r} has no {alias!r} alias to roll back; promote a version first")
    current = client.get_model_version(name, seen.champion)
    previous = (current.tags or {}).get(PREVIOUS_TAG, "")
    if not previous:
        raise RegistryError(
            f"v{seen.champion} of {name!r} records no previous champion; promote a version with "
            f"`cmflow models promote {name} --version N --force`"
        )
    decision = Decision("promote", f"rollback from v{seen.champion} to v{previous}")
    won, message = _move(client, name, alias, seen, previous, "rollback", stale_after_s)
    after = _state(client, name, alias).champion
    if not won:
        return Promotion(name, previous, "lost_race", decision, seen.champion, after, message)
    return Promotion(name, previous, "rolled_back", decision, seen.champion, after, decision.reason)


def require_promoted(result: Promotion) -> Promotion:
    """Raise :class:`GateRejected` unless ``result`` moved (or already had) the alias."""
    if result.outcome in {"promoted", "rolled_back", "noop"}:
        return result
    if result.outcome == "rejected":
        name, version = result.model_name, result.version
        raise GateRejected(
            f"v{version} of {name} fails its gate: {result.message}; to promote it anyway: "
            f'`cmflow models promote {name} --version {version} --force --reason "..."`'
        )
    raise GateRejected(
        f"v{result.version} of {result.model_name} was not promoted ({result.outcome}): {result.message}"
    )


# --------------------------------------------------------------------------------------------------
# Reading


def list_models(client: Any) -> list[Any]:
    """Registered models, without cmflow's promotion tickets."""
    models = registry_call("cannot list registered models", client.search_registered_models, max_results=1000)
    return [m for m in models if TICKET_TAG not in (m.tags or {})]


def versions(client: Any, name: str) -> list[Any]:
    """Every version of ``name``, newest first."""
    registry_call(f"no registered model {name!r}", client.get_registered_model, name)
    found = client.search_model_versions(f"name = '{name}'", max_results=1000)
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)


# --------------------------------------------------------------------------------------------------
# Loading


def load_pyfunc(model_uri: str, tracking_uri: str | None = None) -> Any:
    """Load ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a model folder as a pyfunc model.

    ``models:/`` URIs are resolved with an explicit client for ``tracking_uri`` (MLflow's own resolver
    reads the process-global registry URI), then the files are downloaded into a temporary folder; the
    weights are in memory once loaded, so the folder is removed again.
    """
    import tempfile

    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        return mlflow.pyfunc.load_model(model_uri)
    client = client_for(tracking_uri)
    source = resolve_model_uri(client, model_uri).source
    with tempfile.TemporaryDirectory(prefix="cmflow-load-") as tmp:
        try:
            local = download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=client.tracking_uri)
            return mlflow.pyfunc.load_model(local)
        except MlflowException as exc:
            raise RegistryError(
                f"cannot load {model_uri} from {source}: {exc.message.splitlines()[0]}"
            ) from None
