"""``cmflow scheduler start | stop | status``: the detached Ray actor that ticks schedules."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cmflow.cli.options import RootOpt, default_root

app = typer.Typer(
    help="The scheduler actor on a Ray cluster (ticks every schedule of a root).", no_args_is_help=True
)
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster (GCS) address, e.g. HEAD:6379 (default: auto: $RAY_ADDRESS or "
        "the cluster on this node).",
    ),
]


@app.command("start")
def start(
    address: RayAddressOpt = None,
    root: RootOpt = None,
    interval_s: Annotated[float, typer.Option("--interval-s", help="Seconds between ticks.")] = 30.0,
    submit_address: Annotated[
        str | None,
        typer.Option(
            "--submit-address", help="Job server the actor submits to (default: each schedule's --address)."
        ),
    ] = None,
    ship_code: Annotated[
        bool, typer.Option("--ship-code/--no-ship-code", help="Upload the cmflow package for the actor.")
    ] = True,
) -> None:
    """Start the scheduler actor (idempotent: a running one is reused)."""
    from cmflow import scheduler

    state = scheduler.start(
        address, default_root(root), interval_s=interval_s, submit_address=submit_address, ship_code=ship_code
    )
    typer.echo(
        f"scheduler running on {state['host']} (pid {state['pid']}) for {state['root']}, tick every "
        f"{state['interval_s']:g}s, {state['ticks']} tick(s) so far"
    )


@app.command("stop")
def stop(address: RayAddressOpt = None) -> None:
    """Stop the scheduler actor for good (schedules and their history stay in the storage root)."""
    from cmflow import scheduler

    typer.echo("scheduler stopped" if scheduler.stop(address) else "no scheduler was running")


@app.command("status")
def status(
    address: RayAddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show whether the scheduler runs, its last tick, and its recent fires."""
    from cmflow import scheduler

    state = scheduler.status(address)
    if as_json:
        typer.echo(json.dumps(state, indent=1))
        return
    if state is None:
        typer.echo("no scheduler is running; start one with `cmflow scheduler start --root ROOT`")
        return
    error = f"; last error: {state['last_error']}" if state["last_error"] else ""
    typer.echo(
        f"scheduler on {state['host']} (pid {state['pid']}, since {state['started_at']}) for "
        f"{state['root']}: {state['ticks']} tick(s), {state['fired']} run(s) fired, last tick "
        f"{state['last_tick_at']}{error}"
    )
    for fire in state["recent"]:
        typer.echo(
            f"  {fire['schedule_id']}: {fire['run_id'] or '-'} {fire['outcome']} {fire['reason']}".rstrip()
        )
