"""``cmflow models import FILE_OR_DIR --format openai|diffusers --name NAME`` and
``cmflow models export NAME@ALIAS --format diffusers --out DIR`` (registered in :mod:`cmflow.cli.models`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cmflow.cli.models import TrackingOpt, _client


class ImportFormat(str, Enum):
    auto = "auto"
    openai = "openai"
    diffusers = "diffusers"


class ExportFormat(str, Enum):
    diffusers = "diffusers"


class AdmPreset(str, Enum):
    imagenet64 = "adm-imagenet64"
    lsun256 = "adm-lsun256"


def import_(
    source: Annotated[
        str, typer.Argument(help="A released .pt file (cd_imagenet64_l2.pt, ...) or a diffusers folder.")
    ],
    name: Annotated[str, typer.Option("--name", help="Registered model name.")],
    fmt: Annotated[
        ImportFormat,
        typer.Option("--format", help="openai (.pt state dict), diffusers (pipeline folder) or auto."),
    ] = ImportFormat.auto,
    preset: Annotated[
        AdmPreset | None, typer.Option("--preset", help="openai files: the architecture (default: detected).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="openai files: an ADMConfig field of the architecture, e.g. --set dropout=0.1."
        ),
    ] = None,
    alias: Annotated[str, typer.Option("--alias", help="Alias set on the new version.")] = "challenger",
    two_step_sigma: Annotated[
        float | None,
        typer.Option(
            "--two-step-sigma", help="tau of the 2-step sampler [80, tau], e.g. 1.382 for CD ImageNet-64."
        ),
    ] = None,
    tracking_uri_: TrackingOpt = None,
) -> None:
    """Register a released consistency model (openai .pt or diffusers folder) as a new version of NAME."""
    from cmflow.errors import UsageError
    from cmflow.interop import register_imported
    from cmflow.spec import parse_override

    fields = {}
    for item in overrides or []:
        parts, value = parse_override(item)
        if len(parts) != 1:
            raise UsageError(f"--set {item!r}: name one ADMConfig field, e.g. --set num_classes=0")
        fields[parts[0]] = tuple(value) if isinstance(value, list) else value
    version = register_imported(
        _client(tracking_uri_),
        source,
        fmt.value,  # type: ignore[arg-type]
        name=name,
        preset=preset.value if preset else None,
        overrides=fields,
        alias=alias,
        two_step_sigma=two_step_sigma,
    )
    typer.echo(f"registered {name} v{version.version} (alias {alias}) from {source}")


def export(
    model: Annotated[str, typer.Argument(help="NAME@ALIAS, NAME/VERSION or models:/NAME@ALIAS.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the diffusers pipeline.")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="Only diffusers for now.")
    ] = ExportFormat.diffusers,
    num_train_timesteps: Annotated[
        int | None,
        typer.Option(
            "--num-train-timesteps",
            min=2,
            help="Scheduler grid size N (CD: 40, CT ImageNet-64: 201, CT LSUN: 151; default: the imported "
            "folder's, else 40).",
        ),
    ] = None,
    tracking_uri_: TrackingOpt = None,
) -> None:
    """Write a registered ADM consistency model as a diffusers ConsistencyModelPipeline folder."""
    from cmflow.interop import export_registered

    folder = export_registered(_client(tracking_uri_), model, out, num_train_timesteps=num_train_timesteps)
    typer.echo(f"wrote {folder} (diffusers ConsistencyModelPipeline.from_pretrained loads it)")
