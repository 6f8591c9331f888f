"""Shared option types for the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from cmflow.storage import Storage

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
StorageOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        "-o",
        help="A storage option KEY=VALUE, as the spec's storage.options (e.g. endpoint_url=http://minio:9000); "
        "repeatable.",
    ),
]
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="Ray cluster address (default: start a local Ray).")
]


def default_root(root: str | None) -> str:
    from cmflow.spec import default_root as resolve

    return resolve(root)


def storage_options(items: list[str] | None) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` items -> the options dict (values parsed as YAML scalars, like --set)."""
    import yaml

    from cmflow.errors import UsageError

    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(
                f"--storage-option {item!r} is not KEY=VALUE; write e.g. --storage-option "
                "endpoint_url=http://minio:9000"
            )
        options[key.strip()] = yaml.safe_load(value) if value else ""
    return options


def open_storage(root: str | None, options: list[str] | None) -> Storage:
    """The storage a command reads runs from: ``--root`` (or the default) with ``--storage-option``s."""
    from cmflow.storage import Storage

    return Storage(default_root(root), storage_options(options))
