"""The ``cmflow`` entry point: assembles the command groups and maps known errors to one line."""

from __future__ import annotations

import logging
import os
import sys

import typer

from cmflow.cli import cache, run, runs
from cmflow.cli import fid as fid_cli
from cmflow.cli import interop as interop_cli
from cmflow.cli import models as models_cli
from cmflow.cli import sample as sample_cli
from cmflow.cli import schedule as schedule_cli
from cmflow.cli import scheduler as scheduler_cli
from cmflow.cli import submit as submit_cli

app = typer.Typer(
    name="cmflow",
    help="Consistency-model pipelines on Ray: declare, run, cache, evaluate, register, promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(run.run)
app.command()(run.resume)
app.command()(run.plan)
app.command()(run.validate)
app.command()(run.status)
app.command()(run.schema)
app.add_typer(runs.app, name="runs")
app.add_typer(cache.app, name="cache")
app.add_typer(fid_cli.app, name="fid")
models_cli.app.command("import")(interop_cli.import_)
models_cli.app.command("export")(interop_cli.export)
app.add_typer(models_cli.app, name="models")
app.command()(sample_cli.sample)
app.command()(sample_cli.edit)
app.command()(submit_cli.submit)
app.command()(submit_cli.logs)
app.command()(submit_cli.stop)
app.add_typer(schedule_cli.app, name="schedule")
app.add_typer(scheduler_cli.app, name="scheduler")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors (or set CMFLOW_DEBUG=1)."),
) -> None:
    if debug:
        os.environ["CMFLOW_DEBUG"] = "1"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; known errors print one line to stderr and exit 2 (usage/spec) or 1 (run failure)."""
    from typer._click import exceptions as click_exc  # typer >= 0.20 vendors click here

    from cmflow.errors import CmflowError

    args = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO chatter (db migrations) on stderr
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # nor download progress bars
    # "mlflow" too: when it was imported earlier in this process (tests, notebooks) its level is already set
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    debug = "--debug" in args or os.environ.get("CMFLOW_DEBUG") == "1"
    try:
        result = app(args=args, standalone_mode=False, prog_name="cmflow")
        return int(result) if isinstance(result, int) else 0
    except CmflowError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click_exc.NoArgsIsHelpError as exc:  # a group called bare: show its help, exit 0
        typer.echo(exc.ctx.get_help() if exc.ctx else "")
        return 0
    except click_exc.UsageError as exc:
        if debug:
            raise
        command = exc.ctx.command_path if exc.ctx else "cmflow"
        typer.echo(f"error: {exc.format_message().rstrip('.')}; see `{command} --help`", err=True)
        return 2
    except click_exc.ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("error: interrupted; resume with `cmflow resume RUN`", err=True)
        return 130


def entry() -> None:
    from cmflow.engine.ray_runtime import WORKER_ENV

    for name, value in WORKER_ENV.items():  # before anything imports torch: OpenMP threads that sleep
        os.environ.setdefault(name, value)
    sys.exit(main())


if __name__ == "__main__":
    entry()
