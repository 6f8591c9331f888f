"""``cmflow cache explain RUN STAGE`` and ``cmflow cache gc``."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from cmflow.cli.options import RootOpt, default_root

app = typer.Typer(help="Inspect the stage cache.", no_args_is_help=True)


@app.command("explain")
def explain(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    stage: Annotated[str, typer.Argument(help="Stage name.")],
    root: RootOpt = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list the components that did not change.")
    ] = False,
) -> None:
    """Show how STAGE's cache key in RUN differs from the latest earlier run of it: each changed component
    (a param, an input digest, a code module, a data file, a library version) with its old and new value."""
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
    rows = cache.explain(srec.components, previous[1].components if previous else None)
    changed = [r for r in rows if r.status != "same"]
    against = f"run {previous[0]}" if previous else "no earlier run of this stage"
    console = Console()
    console.print(
        f"{stage} in {run_id}: {srec.status}, key {srec.cache_key[:16]}"
        + (f" — {srec.reason}" if srec.reason else "")
        + f"; compared with {against}: {len(changed)} of {len(rows)} components differ"
    )
    shown = rows if show_all or previous is None else changed
    if not shown:
        return
    table = Table(box=None, pad_edge=False)
    for column in ("component", "previous", "now", ""):
        table.add_column(column, overflow="fold")
    for row in shown:
        style = {"same": "green", "new": "yellow"}.get(row.status, "red")
        table.add_row(
            row.component, cache.short(row.previous), cache.short(row.value), f"[{style}]{row.status}[/]"
        )
    console.print(table)


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_age(text: str) -> float:
    """``"90"``, ``"90s"``, ``"30m"``, ``"1h"``, ``"2d"`` -> seconds; a one-line UsageError otherwise."""
    from cmflow.errors import UsageError

    match = _AGE.match(text.strip())
    if not match:
        raise UsageError(f"--min-age {text!r} is not an age; use seconds or a unit, e.g. 90s, 30m, 1h, 2d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


@app.command("gc")
def gc(
    root: RootOpt = None,
    min_age: Annotated[
        str,
        typer.Option("--min-age", help="Keep manifest-less attempts younger than this (commits in flight)."),
    ] = "1h",
    yes: Annotated[bool, typer.Option("--yes", help="Delete; without it, only list what would go.")] = False,
) -> None:
    """Remove what no committed manifest reaches: unreferenced attempts and work folders of committed keys."""
    from rich.console import Console
    from rich.table import Table

    from cmflow.gc import collect, find_garbage
    from cmflow.storage import Storage

    min_age_s = parse_age(min_age)
    storage = Storage(default_root(root))
    garbage = find_garbage(storage, min_age_s=min_age_s)
    console = Console()
    if not garbage:
        console.print(f"nothing to collect under {storage.uri()}")
        return
    table = Table(title=f"garbage under {storage.uri()}", title_justify="left")
    for column in ("folder", "why", "MB"):
        table.add_column(column)
    for item in garbage:
        table.add_row(item.key, item.reason, f"{item.size / 1e6:.2f}")
    console.print(table)
    total = sum(item.size for item in garbage) / 1e6
    if not yes:
        console.print(f"{len(garbage)} folders, {total:.2f} MB; dry run: pass --yes to delete them")
        return
    freed = collect(storage, garbage)
    console.print(f"deleted {len(garbage)} folders, {freed / 1e6:.2f} MB freed")
