"""``cmflow run | resume | plan | validate | status | schema``."""

from __future__ import annotations

import json
import signal
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from cmflow.errors import Interrupted

from cmflow.cli.options import (
    AddressOpt,
    NoCacheOpt,
    RootOpt,
    SetOpt,
    SpecArg,
    StorageOptionOpt,
    open_storage,
    storage_options,
)


def run(
    spec_path: SpecArg,
    set_: SetOpt = None,
    no_cache: NoCacheOpt = None,
    address: AddressOpt = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Use this run id (default: a new one).")
    ] = None,
) -> None:
    """Run a pipeline: cached stages are skipped, the rest run as Ray tasks. Prints a summary table."""
    from cmflow.validate import load_spec

    spec = load_spec(spec_path, set_ or [])
    _run(spec, no_cache or [], address, run_id)


def _run(spec, no_cache: list[str], address: str | None, run_id: str | None) -> None:  # noqa: ANN001
    from rich.console import Console

    from cmflow.cli.display import LiveDisplay, stage_table
    from cmflow.engine import run_pipeline
    from cmflow.errors import StageError

    console = Console(stderr=True)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt) if in_main else None  # `cmflow stop`
    previous_int = signal.signal(signal.SIGINT, _sigterm_to_interrupt) if in_main else None  # Ctrl-C
    seen: dict[str, Any] = {}

    try:
        with LiveDisplay(console) as display:

            def listen(record, progress) -> None:  # noqa: ANN001
                seen["record"] = record
                display(record, progress)

            record = run_pipeline(spec, no_cache=no_cache, run_id=run_id, address=address, listener=listen)
    except KeyboardInterrupt:  # Ctrl-C or `cmflow stop`: raised here, before Typer turns it into an Abort
        raise _interrupted(spec, seen.get("record"), run_id) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
    Console().print(stage_table(record, final=True))
    if record.status != "succeeded":
        raise StageError(
            f"run {record.run_id} {record.status}: {record.error}; fix it, then `cmflow resume "
            f"{record.run_id}`"
        )
    typer.echo(f"run {record.run_id} succeeded; artifacts under {spec.storage.root}")


def _interrupted(spec, record, run_id: str | None) -> Interrupted:  # noqa: ANN001
    from cmflow.engine import storage_for
    from cmflow.errors import CmflowError, Interrupted

    run_id = record.run_id if record is not None else run_id
    try:
        recorded = run_id is not None and storage_for(spec).exists(f"runs/{run_id}/run.json")
    except CmflowError:
        recorded = False
    if not recorded:
        return Interrupted("interrupted before any stage ran; nothing was recorded, start it again")
    return Interrupted(
        f"run {run_id} interrupted and recorded as stopped; resume with `cmflow resume {run_id}`"
    )


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the driver records the run as stopped before it exits."""
    raise KeyboardInterrupt


def resume(
    run_id: Annotated[str, typer.Argument(help="The run to resume.")],
    root: RootOpt = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
    storage_option: StorageOptionOpt = None,
) -> None:
    """Re-run a run's spec snapshot under the same run id: finished stages are cache hits.

    The run uses the recorded spec's storage options; ``--storage-option`` reads the record (and fills in
    options the record masks, such as a secret key).
    """
    from cmflow.cli.submit import resume_submitted
    from cmflow.engine.records import RunRecord
    from cmflow.spec import apply_overrides
    from cmflow.validate import validate_spec

    storage = open_storage(root, storage_option)
    if resume_submitted(storage, run_id, set_ or []):
        return  # a run submitted to a cluster is resubmitted there
    record = RunRecord.load(storage, run_id)
    snapshot = with_storage_options(record.spec, storage_options(storage_option))
    spec = validate_spec(apply_overrides(snapshot, set_ or []), source=f"run {run_id}")
    _run(spec, [], address, run_id)


def with_storage_options(snapshot: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The recorded spec with its masked ('***') storage options, or missing ones, taken from ``given``."""
    storage = dict(snapshot.get("storage") or {})
    options = dict(storage.get("options") or {})
    for key, value in given.items():
        if options.get(key, "***") == "***":
            options[key] = value
    return {**snapshot, "storage": {**storage, "options": options}}


def plan(spec_path: SpecArg, set_: SetOpt = None, no_cache: NoCacheOpt = None) -> None:
    """Show which stages would be cache hits and which would run, before any work starts."""
    from rich.console import Console
    from rich.table import Table

    from cmflow.engine import plan as make_plan
    from cmflow.validate import load_spec

    spec = load_spec(spec_path, set_ or [])
    table = Table(title=f"plan: {spec.name}", title_justify="left")
    for column in ("stage", "kind", "decision", "cache key", "why"):
        table.add_column(column)
    for row in make_plan(spec, no_cache or []):
        style = "cyan" if row.decision == "hit" else "yellow"
        table.add_row(row.stage, row.kind, f"[{style}]{row.decision}[/]", row.cache_key[:16], row.reason)
    Console().print(table)


def validate(spec_path: SpecArg, set_: SetOpt = None) -> None:
    """Validate a spec: fields, stage kinds and params, inputs and cycles. Exit 2 with one line if bad."""
    from cmflow.validate import load_spec

    spec = load_spec(spec_path, set_ or [])
    typer.echo(
        f"{spec_path}: ok — pipeline {spec.name!r}, {len(spec.stages)} stages: "
        f"{' -> '.join(spec.topological_order())}"
    )


def status(
    run_id: Annotated[str | None, typer.Argument(help="Run id (default: the latest run).")] = None,
    root: RootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")] = False,
    storage_option: StorageOptionOpt = None,
) -> None:
    """Show a run's per-stage status, cache hits and errors (works after the driver is gone).

    For a submitted run the record is checked against Ray's job state (a driver that died reads failed,
    a stopped job reads stopped).
    """
    from rich.console import Console

    from cmflow.cli.display import stage_table
    from cmflow.cli.submit import show_submitted
    from cmflow.engine.records import RunRecord, list_runs
    from cmflow.errors import UsageError

    storage = open_storage(root, storage_option)
    if run_id is None:
        runs = list_runs(storage)
        if not runs:
            raise UsageError(f"no runs under {storage.uri()}; start one with `cmflow run SPEC`")
        run_id = runs[-1].run_id
    if show_submitted(storage, run_id, as_json):
        return  # a run submitted to a cluster: Ray job status + the reconciled run record
    record = RunRecord.load(storage, run_id)
    if as_json:
        typer.echo(json.dumps(record.to_dict(), indent=1))
        return
    from cmflow.engine.driver import load_progress

    Console().print(stage_table(record, load_progress(storage, record), final=True))


def schema(
    stage: Annotated[
        str | None, typer.Option("--stage", help="Only this stage kind's params schema.")
    ] = None,
) -> None:
    """Print the pipeline spec's JSON Schema (with every stage kind's params schema)."""
    from cmflow.errors import UsageError
    from cmflow.validate import json_schema

    data = json_schema()
    if stage is not None:
        if stage not in data["stageParams"]:
            raise UsageError(f"no stage kind {stage!r}; kinds: {', '.join(data['stageParams'])}")
        data = data["stageParams"][stage]
    typer.echo(json.dumps(data, indent=2))
