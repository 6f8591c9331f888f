"""``cmflow schedule create | list | enable | disable | delete | tick | export``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cmflow.cli.options import RootOpt, SetOpt, SpecArg, default_root
from cmflow.cli.submit import JobAddressOpt, TokenFileOpt

app = typer.Typer(help="Recurring and data-triggered runs, stored in the storage root.", no_args_is_help=True)
IdArg = Annotated[str, typer.Argument(help="Schedule id (see `cmflow schedule list`).")]


def _storage(root: str | None):  # noqa: ANN202
    from cmflow.storage import Storage

    return Storage(default_root(root))


@app.command("create")
def create(
    spec_path: SpecArg,
    cron: Annotated[str | None, typer.Option("--cron", help="Cron in --timezone, e.g. '0 3 * * 1'.")] = None,
    timezone_name: Annotated[
        str, typer.Option("--timezone", help="IANA time zone, e.g. Europe/Paris.")
    ] = "UTC",
    catchup: Annotated[str, typer.Option("--catchup", help="Missed fires: latest | all | none.")] = "latest",
    concurrency: Annotated[
        str, typer.Option("--concurrency", help="Previous run still active: forbid | allow | replace.")
    ] = "forbid",
    trigger_manifest: Annotated[
        str | None, typer.Option("--trigger-manifest", help="Fire when this manifest.json's digest changes.")
    ] = None,
    schedule_id: Annotated[
        str | None, typer.Option("--id", help="Schedule id (default: the pipeline name).")
    ] = None,
    address: JobAddressOpt = None,
    starting_deadline_s: Annotated[
        float, typer.Option("--starting-deadline-s", help="--catchup none: a fire may be this late.")
    ] = 300.0,
    max_catchup: Annotated[int, typer.Option("--max-catchup", help="--catchup all: at most this many.")] = 24,
    set_: SetOpt = None,
    root: Annotated[
        str | None, typer.Option("--root", help="Store the schedule here (default: the spec's storage root).")
    ] = None,
) -> None:
    """Create a schedule that submits SPEC at cron times and/or when a dataset manifest changes."""
    from datetime import datetime, timezone

    from cmflow.schedule.cron import iso, next_fire_time
    from cmflow.schedule.store import create_schedule, new_schedule
    from cmflow.storage import Storage
    from cmflow.validate import load_spec

    spec = load_spec(spec_path, set_ or [])
    if cron is None and trigger_manifest is None:
        from cmflow.errors import UsageError

        raise UsageError(
            "pass --cron '0 3 * * 1' and/or --trigger-manifest URI; see `cmflow schedule create --help`"
        )
    now = datetime.now(timezone.utc)
    submit_address = None
    if address is not None:
        from cmflow.submit import resolve_address

        submit_address = resolve_address(address)
    schedule = new_schedule(
        spec.model_dump(mode="json"),
        now=now,
        schedule_id=schedule_id,
        cron=cron,
        timezone_name=timezone_name,
        catchup=catchup,
        concurrency=concurrency,
        trigger_manifest=trigger_manifest,
        address=submit_address,
        starting_deadline_s=starting_deadline_s,
        max_catchup=max_catchup,
    )
    storage = Storage(root) if root else Storage(spec.storage.root, spec.storage.options)
    create_schedule(storage, schedule)
    if submit_address is None:
        typer.echo(
            "note: no --address: ticks need one (`schedule tick --address`, `scheduler start "
            "--submit-address`) unless they run --inline",
            err=True,
        )
    when = ""
    if schedule.cron:
        first = next_fire_time(schedule.cron, schedule.tz, now)
        when = (
            f"; first fire {iso(first)} ({first.astimezone(schedule.tz):%Y-%m-%d %H:%M %Z})" if first else ""
        )
    typer.echo(
        f"created schedule {schedule.id} for pipeline {spec.name} under {storage.uri()}{when}; ticks run "
        f"via `cmflow scheduler start` or `cmflow schedule tick --all --root {storage.uri()}`"
    )


@app.command("list")
def list_(
    root: RootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the schedules as JSON.")] = False,
) -> None:
    """List schedules with their next fire time and their last run's status."""
    from datetime import datetime, timezone

    from rich.console import Console
    from rich.table import Table

    from cmflow.schedule.cron import iso
    from cmflow.schedule.store import last_run_status, list_schedules, load_state, upcoming

    storage = _storage(root)
    now = datetime.now(timezone.utc)
    rows = []
    for schedule in list_schedules(storage):
        state = load_state(storage, schedule)
        overdue, nxt = upcoming(schedule, state, now)

        def local(moment: datetime | None, tz=schedule.tz) -> str | None:  # noqa: ANN001
            return f"{moment.astimezone(tz):%Y-%m-%d %H:%M %Z}" if moment else None

        rows.append(
            {
                "id": schedule.id,
                "pipeline": schedule.pipeline,
                "cron": schedule.cron,
                "timezone": schedule.timezone,
                "enabled": schedule.enabled,
                "catchup": schedule.catchup,
                "concurrency": schedule.concurrency,
                "trigger": schedule.trigger.manifest_uri if schedule.trigger else None,
                "cursor": state.cursor,
                "overdue_fire": iso(overdue) if overdue else None,
                "next_fire": iso(nxt) if nxt else None,
                "next_fire_local": local(nxt),
                "last_run": state.last_run_id,
                "last_run_status": last_run_status(schedule, state),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table(title=f"schedules under {storage.uri()}", title_justify="left")
    for column in ("id", "pipeline", "when", "enabled", "policies", "next fire", "last run"):
        table.add_column(column)
    for row in rows:
        when = " + ".join(
            x
            for x in (
                f"{row['cron']} {row['timezone']}" if row["cron"] else "",
                f"new data at {row['trigger']}" if row["trigger"] else "",
            )
            if x
        )
        nxt = row["next_fire_local"] or ""
        if row["overdue_fire"]:
            nxt = f"due now ({row['overdue_fire']}); then {nxt}"
        last = f"{row['last_run']} ({row['last_run_status']})" if row["last_run"] else ""
        table.add_row(
            row["id"],
            row["pipeline"],
            when,
            "yes" if row["enabled"] else "[red]no[/]",
            f"catchup={row['catchup']} concurrency={row['concurrency']}",
            nxt,
            last,
        )
    Console().print(table)


@app.command("enable")
def enable(schedule_id: IdArg, root: RootOpt = None) -> None:
    """Enable a schedule; fire times missed while it was disabled are not caught up."""
    from datetime import datetime, timezone

    from cmflow.schedule.store import set_enabled

    set_enabled(_storage(root), schedule_id, True, now=datetime.now(timezone.utc))
    typer.echo(f"schedule {schedule_id} enabled")


@app.command("disable")
def disable(schedule_id: IdArg, root: RootOpt = None) -> None:
    """Disable a schedule: no tick fires it until it is enabled again."""
    from datetime import datetime, timezone

    from cmflow.schedule.store import set_enabled

    set_enabled(_storage(root), schedule_id, False, now=datetime.now(timezone.utc))
    typer.echo(f"schedule {schedule_id} disabled")


@app.command("delete")
def delete(schedule_id: IdArg, root: RootOpt = None) -> None:
    """Delete a schedule and its tick history (runs it started are kept)."""
    from cmflow.schedule.store import delete_schedule

    delete_schedule(_storage(root), schedule_id)
    typer.echo(f"schedule {schedule_id} deleted")


@app.command("tick")
def tick_(
    schedule_id: Annotated[str | None, typer.Argument(help="Schedule id (or --all).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Tick every schedule under the root.")] = False,
    now: Annotated[
        str | None,
        typer.Option("--now", help="Pretend it is this ISO time: a dry run unless --commit (default: now)."),
    ] = None,
    commit: Annotated[
        bool, typer.Option("--commit", help="With --now: really fire, claim the times and move the cursor.")
    ] = False,
    root: RootOpt = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Submit to this job server instead of each schedule's own."),
    ] = None,
    token_file: TokenFileOpt = None,
    inline: Annotated[
        bool,
        typer.Option(
            "--inline",
            help="Run due pipelines in this process (inside a Ray job, e.g. a "
            "RayCronJob) instead of submitting Ray jobs.",
        ),
    ] = False,
) -> None:
    """Fire every due time exactly once (safe to run from several places at once); exit 1 if a fire failed.

    With --now T and no --commit it only prints what a tick at T would fire: no marker, no cursor, no job.
    """
    from cmflow.errors import StageError, UsageError
    from cmflow.schedule.cron import parse_time
    from cmflow.schedule.tick import dry_run, tick

    if all_ == (schedule_id is not None):
        raise UsageError("name one schedule or pass --all, e.g. `cmflow schedule tick --all --root ROOT`")
    moment = parse_time(now)
    ids = None if all_ else [schedule_id]
    rehearsal = now is not None and not commit
    if rehearsal:
        fires = dry_run(moment, _storage(root), ids=ids)
    else:
        from cmflow.submit import InlineSubmitter, RayJobSubmitter, resolve_token

        submitter = InlineSubmitter() if inline else RayJobSubmitter(address, resolve_token(token_file))
        fires = tick(moment, _storage(root), submitter, ids=ids)
    for fire in fires:
        when = (
            f" for {fire.fire_time}"
            if fire.fire_time
            else (f" for digest {fire.digest[:12]}" if fire.digest else "")
        )
        reason = f": {fire.reason}" if fire.reason else ""
        outcome = {"due": "would fire", "retry": "would be retried"}.get(fire.outcome, fire.outcome)
        typer.echo(f"schedule {fire.schedule_id}: run {fire.run_id or '-'} {outcome}{when}{reason}")
    if not fires:
        typer.echo("nothing due")
    if rehearsal:
        typer.echo(
            f"dry run at {now}: nothing submitted, no cursor moved; add --commit to fire as if it were then",
            err=True,
        )
    failed = [f for f in fires if f.outcome == "failed"]
    if failed:
        raise StageError(
            f"{len(failed)} fire(s) failed (first: {failed[0].reason}); they are retried on the next tick"
        )


@app.command("export")
def export(
    schedule_id: IdArg,
    kuberay: Annotated[bool, typer.Option("--kuberay", help="Print a KubeRay RayCronJob manifest.")] = False,
    image: Annotated[
        str | None,
        typer.Option("--image", help="Image with cmflow (default: cmflow:0.1.0-ray<installed ray>-gpu)."),
    ] = None,
    namespace: Annotated[str, typer.Option("--namespace", help="Kubernetes namespace.")] = "default",
    gpu_workers: Annotated[int, typer.Option("--gpu-workers", help="GPU worker pods per run.")] = 1,
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="MLFLOW_TRACKING_URI in the pods.")] = (
        "http://mlflow.mlflow.svc:5000"
    ),
    template: Annotated[
        str | None,
        typer.Option(
            "--template", help="RayCronJob template (default: cluster/kuberay/raycronjob.yaml.tmpl)."
        ),
    ] = None,
    root: RootOpt = None,
) -> None:
    """Print a schedule as JSON, or with --kuberay as a RayCronJob that ticks it on an ephemeral cluster."""
    import yaml

    from cmflow.schedule.kuberay import kuberay_cronjob
    from cmflow.schedule.store import load_schedule

    storage = _storage(root)
    schedule = load_schedule(storage, schedule_id)
    if not kuberay:
        typer.echo(json.dumps(schedule.model_dump(mode="json"), indent=1))
        return
    manifest = kuberay_cronjob(
        schedule,
        root=storage.uri(),
        image=image,
        namespace=namespace,
        gpu_workers=gpu_workers,
        tracking_uri=tracking_uri,
        template=template,
    )
    typer.echo(yaml.safe_dump(manifest, sort_keys=False).rstrip())
