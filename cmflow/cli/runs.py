"""``cmflow runs list``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cmflow.cli.options import RootOpt, default_root

app = typer.Typer(help="Runs recorded under a storage root.", no_args_is_help=True)


@app.command("list")
def list_(
    root: RootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per run.")] = False,
) -> None:
    """List runs with their status and cache hits."""
    from rich.console import Console
    from rich.table import Table

    from cmflow.engine.records import list_runs
    from cmflow.storage import Storage

    records = list_runs(Storage(default_root(root)))
    if as_json:
        for record in records:
            typer.echo(
                json.dumps(
                    {
                        "run_id": record.run_id,
                        "pipeline": record.pipeline,
                        "status": record.status,
                        "created_at": record.created_at,
                    }
                )
            )
        return
    table = Table(title=f"runs under {default_root(root)}", title_justify="left")
    width = max((len(r.run_id) for r in records), default=3)
    table.add_column("run", no_wrap=True, min_width=width)
    for column in ("pipeline", "status", "created", "stages (hit/ran/failed)"):
        table.add_column(column)
    for record in records:
        statuses = [s.status for s in record.stages.values()]
        counts = f"{statuses.count('hit')}/{statuses.count('done')}/{statuses.count('failed')}"
        table.add_row(record.run_id, record.pipeline, record.status, record.created_at[:19], counts)
    Console().print(table)
