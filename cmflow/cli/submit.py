"""``cmflow submit | logs | stop``, and the hooks that make ``status`` / ``resume`` work for submitted runs."""

from __future__ import annotations

import json
import sys
import threading
from typing import TYPE_CHECKING, Annotated

import typer

from cmflow.cli.options import RootOpt, SetOpt, SpecArg, StorageOptionOpt, open_storage

if TYPE_CHECKING:
    from cmflow.engine.records import RunRecord
    from cmflow.storage import Storage
    from cmflow.submit import ClusterTarget, Submission

JobAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray job server (dashboard), e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS).",
    ),
]
TokenFileOpt = Annotated[
    str | None,
    typer.Option(
        "--token-file",
        help="File holding the Ray auth token (default: $RAY_AUTH_TOKEN, "
        "$RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token).",
    ),
]
RunArg = Annotated[str, typer.Argument(help="The cmflow run id (also the Ray submission id).")]


def submit(
    spec_path: SpecArg,
    address: JobAddressOpt = None,
    set_: SetOpt = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Use this run id (default: a new one).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the run to end; exit 1 unless it succeeds.")
    ] = False,
    timeout_s: Annotated[
        float | None, typer.Option("--timeout-s", help="With --wait: give up after this.")
    ] = None,
    token_file: TokenFileOpt = None,
    ship_code: Annotated[
        bool,
        typer.Option(
            "--ship-code/--no-ship-code",
            help="Upload the cmflow package with the job "
            "(--no-ship-code: the cluster image has cmflow installed).",
        ),
    ] = True,
    python: Annotated[str, typer.Option("--python", help="Python executable on the cluster.")] = "python",
    env: Annotated[
        list[str] | None, typer.Option("--env", help="Extra job env var KEY=VALUE (repeatable).")
    ] = None,
    forward_credentials: Annotated[
        bool,
        typer.Option(
            "--forward-credentials/--no-forward-credentials",
            help="Copy AWS_*/MLFLOW_* credentials from this shell into the job's env.",
        ),
    ] = True,
    allow_local_root: Annotated[
        bool,
        typer.Option(
            "--allow-local-root", help="Allow a local storage root (a filesystem shared with the cluster)."
        ),
    ] = False,
) -> None:
    """Run a pipeline on a Ray cluster as a Ray job (submission id = run id; a second submit is refused)."""
    from cmflow.submit import parse_env, submit_spec, target_for
    from cmflow.validate import load_spec

    spec = load_spec(spec_path, set_ or [])
    quiet_ray_client()
    target = target_for(address, token_file)
    sub = submit_spec(
        spec,
        target,
        run_id=run_id,
        ship_code=ship_code,
        python=python,
        extra_env=parse_env(env),
        forward_credentials=forward_credentials,
        allow_local_root=allow_local_root,
    )
    if spec.redacted() != spec.model_dump(mode="json"):
        typer.echo(
            "warning: the spec holds secrets; they were shipped with the job but are masked in the run "
            "record, so `cmflow resume` needs them from the environment or --set",
            err=True,
        )
    root_hint = f" --root {spec.storage.root}"
    typer.echo(
        f"submitted run {sub.run_id} to {target.address} as Ray job {sub.current}; follow it with "
        f"`cmflow logs {sub.run_id} --follow{root_hint}`"
    )
    if wait:
        _wait_and_report(spec.storage.root, spec.storage.options, sub, target, timeout_s)


def _wait_and_report(
    root: str, options: dict, sub: Submission, target: ClusterTarget, timeout_s: float | None
) -> None:
    from rich.console import Console

    from cmflow.cli.display import stage_table
    from cmflow.engine.records import RunRecord
    from cmflow.errors import CmflowError, StageError
    from cmflow.storage import Storage
    from cmflow.submit import job_info, reconcile, wait_for

    # the run's progress as it happens (the driver's log, as `ray job submit` streams it) while the job runs
    streamer = threading.Thread(target=_stream_logs, args=(sub, target), daemon=True)
    streamer.start()
    status = wait_for(sub, target, timeout_s=timeout_s)
    streamer.join(timeout=10)  # the stream ends with the job; its last lines may still be on the way
    job = job_info(sub, target) if status != "UNKNOWN" else {}
    job = job or {"submission_id": sub.current, "status": status, "message": "the cluster lost the job"}
    record: RunRecord | None
    try:
        record = reconcile(RunRecord.load(Storage(root, options), sub.run_id), job)
        Console().print(stage_table(record, final=True))
    except CmflowError:
        record = None
    if status != "SUCCEEDED":
        raise StageError(
            f"run {sub.run_id} ended {status}: {_driver_error(record, job, sub, target)}; see `cmflow logs "
            f"{sub.run_id}`, then `cmflow resume {sub.run_id}`"
        )
    typer.echo(f"run {sub.run_id} succeeded on {target.address}")


#: Ray client log lines that tell an operator nothing (the job client announces every package it uploads)
RAY_CLIENT_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")


def quiet_ray_client() -> None:
    """Silence the Ray job client's INFO lines (``Uploading package gcs://…``); warnings still show."""
    import logging

    for name in RAY_CLIENT_LOGGERS:
        try:
            __import__(name)  # the module sets its logger to INFO when imported: set it after that
        except ImportError:
            continue
        logging.getLogger(name).setLevel(logging.WARNING)


def _stream_logs(sub: Submission, target: ClusterTarget) -> None:
    """Copy the job's log to stdout line by line until the job ends (best effort: the wait decides)."""
    from cmflow.errors import CmflowError
    from cmflow.submit import follow_logs

    writer = _LineWriter()
    try:
        follow_logs(sub, target, writer)
    except CmflowError as exc:
        typer.echo(f"warning: stopped streaming the run's log: {exc}", err=True)
    writer.close()


class _LineWriter:
    """Writes log chunks to stdout as whole lines, leaving out :data:`RAY_NOISE` lines."""

    def __init__(self) -> None:
        self.partial = ""

    def __call__(self, chunk: str) -> None:
        from cmflow.engine.ray_runtime import RAY_NOISE

        *lines, self.partial = (self.partial + chunk).split("\n")
        kept = [line + "\n" for line in lines if not any(p in line for p in RAY_NOISE)]
        if kept:
            sys.stdout.write("".join(kept))
            sys.stdout.flush()

    def close(self) -> None:
        if self.partial:
            self("\n")


def _driver_error(record: RunRecord | None, job: dict, sub: Submission, target: ClusterTarget) -> str:
    """The driver's own one-line error, in full: the run record's, else the last ``error:`` line of the
    driver log, else the first line of Ray's message (never a cut log tail)."""
    from cmflow.errors import CmflowError
    from cmflow.submit import job_logs

    if record is not None and record.error:
        return record.error
    try:
        lines = [ln for ln in job_logs(sub, target).splitlines() if ln.startswith("error: ")]
    except CmflowError:
        lines = []
    if lines:
        return lines[-1][len("error: ") :]
    return (str(job.get("message") or "").strip().splitlines() or ["no reason given"])[0]


def _submission(
    root: str | None, run_id: str, token_file: str | None, options: list[str] | None = None
) -> tuple[Submission, ClusterTarget]:
    from cmflow.submit import ClusterTarget, require_submission, resolve_token

    sub = require_submission(open_storage(root, options), run_id)
    return sub, ClusterTarget(sub.address, resolve_token(token_file))


def logs(
    run_id: RunArg,
    root: RootOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
    token_file: TokenFileOpt = None,
    storage_option: StorageOptionOpt = None,
) -> None:
    """Print the driver log of a submitted run (the Ray job's log)."""
    from cmflow.submit import follow_logs, job_logs

    sub, target = _submission(root, run_id, token_file, storage_option)
    quiet_ray_client()
    if follow:
        writer = _LineWriter()
        follow_logs(sub, target, writer)
        writer.close()
    else:
        sys.stdout.write(job_logs(sub, target))


def stop(
    run_id: RunArg,
    root: RootOpt = None,
    token_file: TokenFileOpt = None,
    storage_option: StorageOptionOpt = None,
) -> None:
    """Stop a submitted run (its Ray job); resume it later with `cmflow resume RUN`."""
    from cmflow.submit import job_status, stop_job

    sub, target = _submission(root, run_id, token_file, storage_option)
    if stop_job(sub, target):
        typer.echo(
            f"stopping run {run_id} (Ray job {sub.current} on {sub.address}); resume with "
            f"`cmflow resume {run_id}`"
        )
    else:
        typer.echo(f"run {run_id} was not running (Ray job {sub.current}: {job_status(sub, target)})")


# --------------------------------------------------------------------------------------------------
# Hooks for `cmflow status` and `cmflow resume` (cmflow/cli/run.py)


def show_submitted(storage: Storage, run_id: str, as_json: bool) -> bool:
    """Print the Ray job status and the run record of a submitted run; False for runs not submitted."""
    from dataclasses import asdict

    from rich.console import Console

    from cmflow.cli.display import stage_table
    from cmflow.engine.records import RunRecord, UnreadableRecord
    from cmflow.errors import UsageError
    from cmflow.submit import load_submission, ray_job, reconcile, resolve_token

    sub = load_submission(storage, run_id)
    if sub is None:
        return False
    job = ray_job(sub, resolve_token())
    try:
        record: RunRecord | None = reconcile(RunRecord.load(storage, run_id), job)
    except UnreadableRecord:
        raise
    except UsageError:
        record = None
    if as_json:
        index = {k: v for k, v in asdict(sub).items() if k != "spec"}
        data = record.to_dict() if record else {"run_id": run_id, "status": "submitted"}
        typer.echo(json.dumps({**data, "ray_job": job, "submission": index}, indent=1))
        return True
    first = (str(job.get("message") or "").strip().splitlines() or [""])[0]
    message = f" — {first}" if first else ""
    if job["status"] == "UNAVAILABLE":
        message = (
            f" — Ray is unreachable, so the record below is as the driver last wrote it: {job['message']}"
        )
    typer.echo(f"Ray job {job['submission_id']} on {sub.address}: {job['status']}{message}")
    if record is None:
        typer.echo(f"the driver has not written runs/{run_id}/run.json yet")
    else:
        from cmflow.engine.driver import load_progress

        Console().print(stage_table(record, load_progress(storage, record), final=True))
    return True


def resume_submitted(storage: Storage, run_id: str, overrides: list[str]) -> bool:
    """Resubmit a submitted run as ``<run_id>-r<n>`` (same run id); False for runs not submitted."""
    from cmflow.submit import load_submission, resolve_token, resubmit

    if load_submission(storage, run_id) is None:
        return False
    sub = resubmit(storage, run_id, overrides=overrides, token=resolve_token())
    typer.echo(
        f"resubmitted run {run_id} as Ray job {sub.current} to {sub.address}; finished stages are cache "
        f"hits; follow it with `cmflow logs {run_id} --follow --root {storage.uri()}`"
    )
    return True
