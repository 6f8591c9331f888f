"""Stage kinds ``register`` (a model artifact -> a registry version with alias ``challenger``) and
``promote`` (gate the registered version against ``champion`` and move the alias).

The gate is declared once, on ``register`` (``params.gate``), and recorded on the version
(``cmflow.gate``); the ``promote`` stage and ``cmflow models promote`` both apply the recorded gate.

``register`` logs the pyfunc model (:mod:`cmflow.serving`) in the stage's own MLflow child run and is
idempotent per cache key (a retried or uncached rerun reuses its version). ``promote`` depends on
registry state that is not part of its cache key, so declare it with ``cache: {enabled: false}``; a cache
hit would replay an old decision instead of deciding against the current champion.

Both stages talk to the pipeline's tracking server (``tracking.uri``, or the SQLite store under a local
root), or to ``params.tracking_uri``. Put credentials in ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, never in the URI: params are part of the cache key, which is stored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cmflow.errors import SpecError, StageError
from cmflow.stage import Artifact, ParamsModel, StageContext, stage

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,62}$"


def _no_password(value: str | None) -> str | None:
    from cmflow.redact import redact_uri

    if value is not None and redact_uri(value) != value:
        raise ValueError(
            "tracking_uri must not contain a password (params are stored in the cache key); set "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead"
        )
    return value


class GateParams(ParamsModel):
    """The promotion gate recorded on the registered version (lower metric values are better)."""

    metric: str = Field("fid_1step", description="Version tag the gate compares (lower is better).")
    max_fid: float | None = Field(None, gt=0, description="Absolute gate: metric <= max_fid.")
    tolerance: float = Field(
        0.0, ge=0, description="Relative gate: metric <= champion's metric x (1 + tolerance)."
    )


class RegisterParams(ParamsModel):
    model_name: str = Field(pattern=NAME_PATTERN, description="Registered model name.")
    alias: str = Field("challenger", pattern=ALIAS_PATTERN, description="Alias set on the new version.")
    tracking_uri: str | None = Field(None, description="MLflow URI; default: the pipeline's tracking store.")
    experiment: str | None = Field(
        None, description="Experiment for the registration run when the pipeline does not track."
    )
    description: str = Field("", description="Description of the new version.")
    gate: GateParams = Field(
        default_factory=GateParams, description="The gate every promotion of this version applies."
    )

    @field_validator("tracking_uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        return _no_password(value)


class PromoteParams(ParamsModel):
    policy: Literal["auto", "manual"] = Field(
        "auto", description="auto: move the alias when the gate passes; manual: record the decision only."
    )
    alias: str = Field("champion", pattern=ALIAS_PATTERN, description="The alias to move.")
    tracking_uri: str | None = Field(None, description="MLflow URI; default: the pipeline's tracking store.")
    fail_on_reject: bool = Field(False, description="Fail the stage when the candidate is not promoted.")

    @model_validator(mode="before")
    @classmethod
    def _gate_moved(cls, data: Any) -> Any:
        moved = sorted({"metric", "max_fid", "tolerance"} & set(data)) if isinstance(data, dict) else []
        if moved:
            raise ValueError(
                f"{', '.join(moved)} moved to the register stage: set them under its params.gate (the "
                "gate is recorded on the version and every promotion applies it)"
            )
        return data

    @field_validator("tracking_uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        return _no_password(value)


def _tracking_uri(override: str | None, ctx: StageContext) -> str:
    """The override, the pipeline's tracking URI, or the SQLite store under a local storage root."""
    from cmflow.mlflow_client import resolve_tracking_uri

    pipeline = str(ctx.tracking["uri"]) if ctx.tracking and ctx.tracking.get("uri") else None
    try:
        return resolve_tracking_uri(override or pipeline, ctx.storage.root)
    except SpecError as exc:
        raise StageError(f"stage {ctx.stage!r}: {exc}; or set params.tracking_uri") from None


def _registration_run(
    client: Any, uri: str, params: RegisterParams, ctx: StageContext
) -> tuple[str, str, bool]:
    """(run id, experiment id, owned): the stage's child run, or a run of our own on another server."""
    tracking = ctx.tracking or {}
    if tracking.get("stage_run_id") and tracking.get("uri") == uri:
        return str(tracking["stage_run_id"]), str(tracking["experiment_id"]), False
    from cmflow.mlflow_client import experiment_id

    name = params.experiment or str(tracking.get("pipeline") or "cmflow-registry")
    exp = experiment_id(client, name)
    tags = {"cmflow.run_id": ctx.run_id, "cmflow.stage": ctx.stage, "cmflow.cache_key": ctx.cache_key}
    run = client.create_run(exp, tags=tags, run_name=f"{ctx.stage}-{ctx.run_id}")
    return run.info.run_id, exp, True


def _report(report: Artifact | None) -> tuple[dict[str, float], str]:
    """FID/NFE numbers and the reference-stats digest of the evaluate stage's artifact (if any)."""
    from cmflow.registry import report_metrics

    if report is None:
        return {}, ""
    values: dict[str, Any] = {}
    if "report.json" in report.files:
        data = report.read_json("report.json")
        if isinstance(data, dict):
            values.update(data)
    values.update(report.meta)
    digest = str(values.get("ref_stats_digest") or "")
    return report_metrics(values), digest


@stage(
    "register",
    params=RegisterParams,
    version="1",
    inputs=("model",),
    optional_inputs=("report", "data"),
)
def register(params: RegisterParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Register the ``model`` artifact (model.safetensors + model.json) as a new version; alias challenger.

    The version is tagged with the run id, cache key, model/dataset digests, the evaluate ``report``'s FID
    and NFE numbers, its reference-stats digest and the gate (``cmflow.gate``) every promotion applies.
    Writes ``registered.json``.

    Examples:
        register: {kind: register, inputs: {model: distill, report: evaluate, data: data},
                   params: {model_name: cm-digits, gate: {max_fid: 20, tolerance: 0.05}}}
    """
    from cmflow.mlflow_client import client_for
    from cmflow.redact import redact_uri
    from cmflow.registry import GATE_SPEC_TAG, Gate, register_version

    model = inputs["model"]
    for name in ("model.safetensors", "model.json"):
        if name not in model.files:
            raise StageError(f"input 'model' has no {name}; connect a distill/train_cm stage")
    metrics, ref_digest = _report(inputs.get("report"))
    data = inputs.get("data")
    # the dataset's content digest; without a data input, the one the training stage wrote in model.json
    dataset_digest = str(data.meta.get("digest") or data.digest) if data is not None else ""
    dataset_digest = dataset_digest or str(model.read_json("model.json").get("dataset_digest") or "")
    uri = _tracking_uri(params.tracking_uri, ctx)
    client = client_for(uri)
    run_id, exp, owned = _registration_run(client, uri, params, ctx)
    tags = {
        "cmflow.run_id": ctx.run_id,
        "cmflow.cache_key": ctx.cache_key,
        "cmflow.stage_run_id": run_id,
        "cmflow.model_digest": model.digest,
        "cmflow.model_uri": model.uri,
        **({"cmflow.ref_stats_digest": ref_digest} if ref_digest else {}),
        **({"cmflow.dataset_digest": dataset_digest} if dataset_digest else {}),
        **{key: repr(value) for key, value in metrics.items()},
    }
    tags = {key: redact_uri(value) for key, value in tags.items()}
    tags[GATE_SPEC_TAG] = Gate(params.gate.metric, params.gate.max_fid, params.gate.tolerance).to_tag()
    try:
        version = register_version(
            client,
            name=params.model_name,
            run_id=run_id,
            experiment_id=exp,
            weights=model.path("model.safetensors"),
            config=model.path("model.json"),
            tags=tags,
            alias=params.alias,
            description=params.description,
        )
    finally:
        if owned:
            client.set_terminated(run_id)
    registered = {
        "model_name": params.model_name,
        "version": str(version.version),
        "model_uri": f"models:/{params.model_name}/{version.version}",
        "alias": params.alias,
        "run_id": run_id,
        "metrics": metrics,
    }
    (ctx.out_dir / "registered.json").write_text(json.dumps(registered, indent=1, sort_keys=True))
    return {k: v for k, v in registered.items() if k != "run_id"}


def _tag_stage_run(ctx: StageContext, tags: dict[str, str]) -> None:
    """Record this execution's decision on the stage's own MLflow run.

    The committed ``promotion.json`` is write-once per cache key, so with ``cache.enabled: false`` a rerun
    whose inputs are unchanged keeps the first run's file; the run's tags tell what this run decided.
    """
    tracking = ctx.tracking or {}
    if not tracking.get("stage_run_id"):
        return
    from cmflow.mlflow_client import client_for

    client = client_for(str(tracking["uri"]))
    for key, value in tags.items():
        client.set_tag(str(tracking["stage_run_id"]), key, value)


@stage("promote", params=PromoteParams, version="1", inputs=("registered",))
def promote(params: PromoteParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Gate the registered version against the current champion and, with policy auto, promote it.

    The gate is the one the version was registered under (the register stage's ``params.gate``):
    ``metric <= max_fid`` and ``metric <= champion's metric x (1 + tolerance)``. Writes ``promotion.json``
    (the decision, the champion before and after). Registry state is not in the cache key: declare this
    stage with ``cache: {enabled: false}``.

    Examples:
        promote: {kind: promote, inputs: {registered: register}, cache: {enabled: false},
                  params: {policy: auto}}
    """
    from cmflow.errors import GateRejected
    from cmflow.mlflow_client import client_for
    from cmflow.registry import promote as promote_version

    registered = inputs["registered"].read_json("registered.json")
    client = client_for(_tracking_uri(params.tracking_uri, ctx))
    result = promote_version(
        client, registered["model_name"], registered["version"], policy=params.policy, alias=params.alias
    )
    summary = result.to_dict()
    _tag_stage_run(
        ctx,
        {
            "cmflow.promotion.outcome": result.outcome,
            "cmflow.promotion.version": result.version,
            "cmflow.promotion.champion_before": result.champion_before or "",
            "cmflow.promotion.champion_after": result.champion_after or "",
            "cmflow.promotion.reason": result.message[:5000],
        },
    )
    (ctx.out_dir / "promotion.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    if params.fail_on_reject and result.outcome not in {"promoted", "noop"}:
        raise GateRejected(f"v{result.version} of {result.model_name} was not promoted: {result.message}")
    return {
        "model_name": result.model_name,
        "version": result.version,
        "outcome": result.outcome,
        "champion_before": result.champion_before,
        "champion_after": result.champion_after,
        "reason": result.decision.reason,
    }
