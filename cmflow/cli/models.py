"""``cmflow models list | describe NAME | promote NAME --version N [--force --reason R] | rollback NAME``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

app = typer.Typer(help="Registered models: versions, aliases, promotion and rollback.", no_args_is_help=True)

TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under $CMFLOW_ROOT or "
        "./cmflow-artifacts).",
    ),
]
AliasOpt = Annotated[str, typer.Option("--alias", help="The production alias.")]


def tracking_uri(value: str | None) -> str:
    """The URI the models commands use (:func:`cmflow.mlflow_client.resolve_tracking_uri`)."""
    from cmflow.mlflow_client import resolve_tracking_uri

    return resolve_tracking_uri(value)


def _client(value: str | None) -> Any:
    from cmflow.mlflow_client import client_for

    return client_for(value)


def rounded(value: str) -> str:
    """A tag as shown: floats to 4 significant digits (``7.123``; tags hold ``repr(float)``), else as is."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return f"{number:.4g}"


def _when(ms: int | None) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp((ms or 0) / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M") if ms else ""


@app.command("list")
def list_(tracking_uri_: TrackingOpt = None) -> None:
    """List registered models with their aliases and latest version."""
    from rich.console import Console
    from rich.table import Table

    from cmflow.registry import list_models

    table = Table(title="registered models", title_justify="left")
    for column in ("name", "aliases", "latest", "updated"):
        table.add_column(column)
    for model in list_models(_client(tracking_uri_)):
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted((model.aliases or {}).items()))
        latest = max((int(v.version) for v in model.latest_versions or []), default=0)
        table.add_row(
            model.name, aliases, f"v{latest}" if latest else "", _when(model.last_updated_timestamp)
        )
    Console().print(table)


@app.command("describe")
def describe(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    tracking_uri_: TrackingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show every version of NAME with its aliases, gate metrics and lineage tags."""
    from rich.console import Console
    from rich.table import Table

    from cmflow.registry import PREVIOUS_TAG, STATUS_TAG, versions

    client = _client(tracking_uri_)
    found = versions(client, name)
    aliases = client.get_registered_model(name).aliases or {}
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    if as_json:
        rows = [
            {"version": mv.version, "aliases": sorted(by_version.get(str(mv.version), [])), "tags": mv.tags}
            for mv in found
        ]
        typer.echo(json.dumps({"name": name, "aliases": aliases, "versions": rows}, indent=1, default=str))
        return
    table = Table(title=f"{name}", title_justify="left")
    for column in ("version", "aliases", "metrics", "status", "previous", "run", "created"):
        table.add_column(column)
    for mv in found:
        tags = mv.tags or {}
        metrics = "\n".join(
            f"{k}={rounded(v)}" for k, v in sorted(tags.items()) if not k.startswith("cmflow.")
        )
        table.add_row(
            f"v{mv.version}",
            ", ".join(sorted(by_version.get(str(mv.version), []))),
            metrics,
            tags.get(STATUS_TAG, ""),
            f"v{tags[PREVIOUS_TAG]}" if tags.get(PREVIOUS_TAG) else "",
            tags.get("cmflow.run_id", ""),
            _when(mv.creation_timestamp),
        )
    Console().print(table)


@app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Option("--version", "-v", help="The version to promote.", min=1)],
    force: Annotated[
        bool,
        typer.Option("--force", help="Promote past a failed gate (needs --reason; tagged 'forced')."),
    ] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why --force may skip the gate.")] = "",
    metric: Annotated[
        str | None, typer.Option("--metric", help="Gate metric, for a version registered without a gate.")
    ] = None,
    max_fid: Annotated[
        float | None, typer.Option("--max-fid", help="Absolute gate, for a version without a gate.")
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance", help="Relative gate vs the champion, for a version without a gate.", min=0
        ),
    ] = None,
    alias: AliasOpt = "champion",
    tracking_uri_: TrackingOpt = None,
) -> None:
    """Promote version N of NAME to the champion alias if it passes the gate it was registered under."""
    from cmflow.errors import UsageError
    from cmflow.registry import Gate, require_promoted
    from cmflow.registry import promote as promote_version

    if reason and not force:
        raise UsageError("--reason goes with --force; drop it, or add --force to promote past the gate")
    gate = None
    if (metric, max_fid, tolerance) != (None, None, None):
        gate = Gate(metric=metric or "fid_1step", max_fid=max_fid, tolerance=tolerance or 0.0)
    client = _client(tracking_uri_)
    result = promote_version(client, name, version, gate, force=force, reason=reason, alias=alias)
    require_promoted(result)
    typer.echo(
        f"{name}@{alias}: v{result.champion_before or '-'} -> v{result.champion_after} ({result.message})"
    )


@app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: AliasOpt = "champion",
    tracking_uri_: TrackingOpt = None,
) -> None:
    """Move the champion alias back to the previous champion recorded on the current one."""
    from cmflow.registry import require_promoted
    from cmflow.registry import rollback as rollback_version

    result = require_promoted(rollback_version(_client(tracking_uri_), name, alias=alias))
    typer.echo(f"{name}@{alias}: v{result.champion_before} -> v{result.champion_after} (rolled back)")
