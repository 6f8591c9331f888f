"""``cmflow cache explain RUN STAGE``."""

from __future__ import annotations

from typing import Annotated

import typer

from cmflow.cli.options import RootOpt, default_root

app = typer.Typer(help="Inspect the stage cache.", no_args_is_help=True)


@app.command("explain")
def explain(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    stage: Annotated[str, typer.Argument(help="Stage name.")],
    root: RootOpt = None,
) -> None:
    """Print each cache-key component of STAGE in RUN and which differ from the previous run of it."""
    from rich.console import Console
    from rich.table import Table

    from cmflow import cache
    from cmflow.engine.records import RunRecord, previous_stage_record
    from cmflow.errors import UsageError
    from cmflow.storage import Storage

    storage = Storage(default_root(root))
    record = RunRecord.load(storage, run_id)
    srec = record.stages.get(stage)
    if srec is None:
        raise UsageError(f"run {run_id} has no stage {stage!r}; stages: {', '.join(record.stages)}")
    if not srec.components:
        raise UsageError(f"stage {stage!r} of run {run_id} never computed a key (status {srec.status})")
    previous = previous_stage_record(storage, record, stage)
    table = Table(
        title=f"{stage} in {run_id}: {srec.status} (key {srec.cache_key[:16]})"
        + (f" — {srec.reason}" if srec.reason else ""),
        title_justify="left",
    )
    for column in ("component", "value", "vs previous run"):
        table.add_column(column)
    for name, value, state in cache.explain(srec.components, previous.components if previous else None):
        style = {"changed": "red", "same": "green"}.get(state, "dim")
        table.add_row(name, value, f"[{style}]{state}[/]")
    Console().print(table)
