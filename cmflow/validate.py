"""Load a pipeline file and check it against the stage table, before anything runs.

:mod:`cmflow.spec` holds the declared schema; this module adds what needs the stage table
(:data:`cmflow.stages.table.STAGES`): every stage's kind, its params (validated by the kind's own model, defaults
filled in so cache keys see the values actually used), its ``cache.ignore`` names and its inputs, then the
graph. Each rule is a small named ``check_*`` function that raises :class:`SpecError` with one line naming
the field and the fix (Metaflow's ``lint.py`` does the same for flows); :data:`STAGE_CHECKS` lists them in the
order they run.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cmflow.errors import SpecError
from cmflow.spec import PipelineSpec, StageSpec, apply_overrides, read_yaml
from cmflow.stage import StageDef

StageTable = Mapping[str, StageDef]


def default_stages() -> StageTable:
    from cmflow.stages.table import STAGES

    return STAGES


def load_spec(
    path: str | Path,
    overrides: Iterable[str] = (),
    *,
    resolve_paths: bool = True,
    stages: StageTable | None = None,
) -> PipelineSpec:
    """Read, override and fully validate a pipeline spec file."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_spec(raw, source=str(path), resolve_paths=resolve_paths, stages=stages)


def validate_spec(
    raw: dict[str, Any],
    *,
    source: str = "spec",
    resolve_paths: bool = True,
    stages: StageTable | None = None,
) -> PipelineSpec:
    """Validate structure, stage kinds, per-kind params and the stage graph; fill in param defaults."""
    table = default_stages() if stages is None else stages
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(one_line(exc, source, PipelineSpec)) from None
    checked: dict[str, StageSpec] = {}
    for name, stage in spec.stages.items():
        definition = check_kind(source, name, stage, table)
        params = check_params(source, name, stage, definition)
        for check in STAGE_CHECKS:
            check(source, name, stage, definition, spec)
        checked[name] = stage.model_copy(update={"params": params})
    root = spec.storage.root
    if resolve_paths and "://" not in root:
        root = str(Path(os.path.expanduser(root)).resolve())
    spec = spec.model_copy(
        update={"stages": checked, "storage": spec.storage.model_copy(update={"root": root})}
    )
    spec.topological_order()  # raises on cycles
    return spec


# -- the named checks ----------------------------------------------------------------------------------------


def check_kind(source: str, name: str, stage: StageSpec, table: StageTable) -> StageDef:
    """The stage's kind is in the table (with a "did you mean")."""
    definition = table.get(stage.kind)
    if definition is None:
        hint = difflib.get_close_matches(stage.kind, table, n=1)
        maybe = f"did you mean {hint[0]!r}? " if hint else ""
        raise SpecError(
            f"{source}: stages.{name}.kind {stage.kind!r} is not a stage kind; {maybe}"
            f"known kinds: {', '.join(sorted(table))}"
        )
    return definition


def check_params(source: str, name: str, stage: StageSpec, definition: StageDef) -> dict[str, Any]:
    """The params validate against the kind's model; returns them with every default filled in."""
    try:
        params = definition.params_model.model_validate(stage.params)
    except ValidationError as exc:
        raise SpecError(
            one_line(exc, source, definition.params_model, prefix=f"stages.{name}.params")
        ) from None
    return params.model_dump(mode="json")


def check_cache_ignore(
    source: str, name: str, stage: StageSpec, definition: StageDef, spec: PipelineSpec
) -> None:
    """``cache.ignore`` names only params of the kind."""
    for ignored in stage.cache.ignore:
        if ignored not in definition.params_model.model_fields:
            raise SpecError(
                f"{source}: stages.{name}.cache.ignore names {ignored!r}, which is not a param of "
                f"{stage.kind}; params are: {', '.join(definition.params_model.model_fields)}"
            )


def check_input_names(
    source: str, name: str, stage: StageSpec, definition: StageDef, spec: PipelineSpec
) -> None:
    """Every input is one the kind takes."""
    for input_name in stage.inputs:
        if input_name not in definition.inputs and input_name not in definition.optional_inputs:
            accepted = ", ".join(definition.inputs + definition.optional_inputs) or "none"
            raise SpecError(
                f"{source}: stages.{name}.inputs.{input_name}: {stage.kind} takes no input "
                f"{input_name!r}; it takes: {accepted}"
            )


def check_upstreams(
    source: str, name: str, stage: StageSpec, definition: StageDef, spec: PipelineSpec
) -> None:
    """Every input names a declared stage other than this one."""
    for input_name, upstream in stage.inputs.items():
        if upstream not in spec.stages:
            raise SpecError(
                f"{source}: stages.{name}.inputs.{input_name} names stage {upstream!r}, which is not "
                f"declared; stages are: {', '.join(spec.stages)}"
            )
        if upstream == name:
            raise SpecError(f"stages form a cycle: {name} -> {name}; a stage cannot be its own input")


def check_required_inputs(
    source: str, name: str, stage: StageSpec, definition: StageDef, spec: PipelineSpec
) -> None:
    """Every input the kind requires is wired."""
    missing = [i for i in definition.inputs if i not in stage.inputs]
    if missing:
        raise SpecError(
            f"{source}: stages.{name} ({stage.kind}) needs input(s) {', '.join(missing)}; "
            f"add e.g. inputs: {{{missing[0]}: <upstream stage>}}"
        )


StageCheck = Callable[[str, str, StageSpec, StageDef, PipelineSpec], None]
#: run in this order for every stage, after :func:`check_kind` and :func:`check_params`
STAGE_CHECKS: tuple[StageCheck, ...] = (
    check_cache_ignore,
    check_input_names,
    check_upstreams,
    check_required_inputs,
)


# -- messages --------------------------------------------------------------------------------------------------


def one_line(exc: ValidationError, source: str, model: type[BaseModel], prefix: str = "") -> str:
    """Turn the first pydantic error into ``source: a.b.c: message; fix``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
    more = exc.error_count() - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    if err["type"] == "extra_forbidden":
        field = str(err["loc"][-1])
        parent = _model_at(model, err["loc"][:-1])
        known = list(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(field, known, n=1)
        maybe = f"did you mean {hint[0]!r}? " if hint else ""
        return f"{source}: {loc} is not a known field; {maybe}allowed: {', '.join(known)}{tail}"
    if err["type"] == "missing":
        return f"{source}: {loc} is required; add it (see `cmflow schema`){tail}"
    given = err.get("input")
    shown = "" if isinstance(given, dict | list) else f" (got {given!r})"
    return f"{source}: {loc}: {err['msg']}{shown}; fix the value (see `cmflow schema`){tail}"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location through nested models (dict keys are skipped)."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                continue  # a dict key such as a stage name
            annotation = field.annotation
            args = getattr(annotation, "__args__", ())
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                current = annotation
            elif args and isinstance(args[-1], type) and issubclass(args[-1], BaseModel):
                current = args[-1]  # dict[str, Model]
            else:
                return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def json_schema(stages: StageTable | None = None) -> dict[str, Any]:
    """The pipeline JSON Schema plus each stage kind's params schema under ``stageParams``."""
    table = default_stages() if stages is None else stages
    schema = PipelineSpec.model_json_schema()
    schema["stageParams"] = {kind: d.params_model.model_json_schema() for kind, d in sorted(table.items())}
    return schema
