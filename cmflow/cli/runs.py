"""``cmflow runs list``."""

from __future__ import annotations

import typer

from cmflow.cli.options import RootOpt, default_root

app = typer.Typer(help="Runs recorded under a storage root.", no_args_is_help=True)


@app.command("list")
def list_(root: RootOpt = None) -> None:
    """List runs with their status and cache hits."""
    from rich.console import Console
    from rich.table import Table

    from cmflow.engine.records import list_runs
    from cmflow.storage import Storage

    table = Table(title=f"runs under {default_root(root)}", title_justify="left")
    for column in ("run", "pipeline", "status", "created", "stages (hit/ran/failed)"):
        table.add_column(column)
    for record in list_runs(Storage(default_root(root))):
        statuses = [s.status for s in record.stages.values()]
        counts = f"{statuses.count('hit')}/{statuses.count('done')}/{statuses.count('failed')}"
        table.add_row(record.run_id, record.pipeline, record.status, record.created_at[:19], counts)
    Console().print(table)
