"""Shared option types for the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SpecArg = Annotated[
    Path,
    typer.Argument(
        help="Pipeline spec (YAML), e.g. pipelines/digits.yaml.", metavar="SPEC", show_default=False
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a spec value: KEY=VALUE, e.g. stages.distill.params.lr=2e-4."),
]
NoCacheOpt = Annotated[
    list[str] | None, typer.Option("--no-cache", help="Re-run this stage even if cached (repeatable).")
]
RootOpt = Annotated[
    str | None,
    typer.Option(
        "--root", help="Storage root holding the runs (default: $CMFLOW_ROOT or ./cmflow-artifacts)."
    ),
]
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="Ray cluster address (default: start a local Ray).")
]


def default_root(root: str | None) -> str:
    from cmflow.spec import default_root as resolve

    return resolve(root)
