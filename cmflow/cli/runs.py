"""``cmflow runs list``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cmflow.cli.options import RootOpt, StorageOptionOpt, default_root, open_storage

app = typer.Typer(help="Runs recorded under a storage root.", no_args_is_help=True)


@app.command("list")
def list_(
    root: RootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per run.")] = False,
    storage_option: StorageOptionOpt = None,
) -> None:
    """List runs with their status and cache hits; submitted runs are checked against Ray's job state."""
    from rich.console import Console
    from rich.table import Table

    from cmflow.engine.records import list_runs
    from cmflow.submit import load_submission, ray_job, reconcile, resolve_token

    storage = open_storage(root, storage_option)
    unreadable: list[tuple[str, str]] = []
    records = list_runs(storage, unreadable)
    notes: dict[str, str] = {}
    token = resolve_token()
    for i, record in enumerate(records):
        if record.status != "running" and record.status != "failed":
            continue  # succeeded and stopped records are final whatever Ray says
        sub = load_submission(storage, record.run_id)
        if sub is None:
            continue
        job = ray_job(sub, token)
        records[i] = reconcile(record, job)
        if job["status"] == "UNAVAILABLE" and record.status == "running":
            notes[record.run_id] = "Ray unreachable"
    if as_json:
        for record in records:
            row = {
                "run_id": record.run_id,
                "pipeline": record.pipeline,
                "status": record.status,
                "created_at": record.created_at,
            }
            if record.run_id in notes:
                row["note"] = notes[record.run_id]
            typer.echo(json.dumps(row))
        for run_id, reason in unreadable:
            typer.echo(json.dumps({"run_id": run_id, "status": "unreadable", "error": reason}))
        return
    table = Table(title=f"runs under {default_root(root)}", title_justify="left")
    width = max((len(r.run_id) for r in records), default=3)
    table.add_column("run", no_wrap=True, min_width=width)
    for column in ("pipeline", "status", "created", "stages (hit/ran/failed)"):
        table.add_column(column)
    for record in records:
        statuses = [s.status for s in record.stages.values()]
        counts = f"{statuses.count('hit')}/{statuses.count('done')}/{statuses.count('failed')}"
        status = f"{record.status} ({notes[record.run_id]})" if record.run_id in notes else record.status
        table.add_row(record.run_id, record.pipeline, status, record.created_at[:19], counts)
    for run_id, reason in unreadable:
        table.add_row(run_id, "?", f"unreadable: {reason}", "", "")
    Console().print(table)
