"""The declared pipeline: pydantic v2 models, YAML reading and ``--set`` overrides.

A pipeline is a name, a storage root, a tracking URI, a seed and a mapping of named stages. Each stage
names its ``kind`` (a key of :data:`cmflow.stages.table.STAGES`), its ``params`` (validated by that kind's own
params model), its ``inputs`` (input name -> upstream stage name), its ``resources``, ``retries`` and
``cache`` settings. This module knows nothing of the stage table; :func:`cmflow.validate.load_spec` checks
a spec against it and returns one whose stage params carry every default, so that cache keys see the
values actually used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cmflow.errors import SpecError
from cmflow.redact import redact

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
DEFAULT_ROOT = "./cmflow-artifacts"


def default_root(root: str | None = None) -> str:
    """``root``, else ``$CMFLOW_ROOT``, else ./cmflow-artifacts; local paths made absolute."""
    value = root or os.environ.get("CMFLOW_ROOT") or DEFAULT_ROOT
    return value if "://" in value else str(Path(os.path.expanduser(value)).resolve())


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-63 characters of lowercase letters, digits, '_' or '-', "
            "starting with a letter (no '/', '..' or spaces)"
        )
    return value


class Resources(_Model):
    """What one task of the stage needs. Training stages run ``workers`` Ray Train workers, each with these."""

    cpus: float = Field(1.0, ge=0, description="CPUs per task (or per Ray Train worker).")
    gpus: float = Field(0.0, ge=0, description="GPUs per task (or per Ray Train worker).")
    memory_gb: float | None = Field(None, gt=0, description="Memory per task in GiB (Ray `memory`).")
    custom: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, e.g. {'gpu_a100': 1}."
    )
    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (training stages only).")

    @field_validator("custom")
    @classmethod
    def _custom_non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if amount < 0:
                raise ValueError(f"custom resource {name!r} must be >= 0, got {amount}")
        return value

    def ray_options(self) -> dict[str, Any]:
        """Options for ``ray.remote(...).options(**)`` of a plain stage task."""
        options: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_gb is not None:
            options["memory"] = int(self.memory_gb * 2**30)
        if self.custom:
            options["resources"] = dict(self.custom)
        return options

    def demand(self) -> dict[str, float]:
        """The per-node demand in Ray's resource names (CPU, GPU, memory bytes, custom)."""
        demand = {"CPU": self.cpus, "GPU": self.gpus, **self.custom}
        if self.memory_gb is not None:
            demand["memory"] = self.memory_gb * 2**30
        return {k: v for k, v in demand.items() if v > 0}


class CacheSpec(_Model):
    enabled: bool = Field(True, description="False: always re-run this stage.")
    version: str = Field("0", description="Bump by hand to invalidate this stage's cache.")
    ignore: list[str] = Field(
        default_factory=list, description="Param names that do not change the output (left out of the key)."
    )


class StageSpec(_Model):
    kind: str = Field(description="Stage kind; `cmflow schema` lists them.")
    params: dict[str, Any] = Field(default_factory=dict, description="Validated by the kind's params model.")
    inputs: dict[str, str] = Field(default_factory=dict, description="input name -> upstream stage name.")
    resources: Resources = Field(default_factory=Resources)
    retries: int = Field(
        2, ge=0, le=20, description="Retries on transient errors (network, store, lost worker)."
    )
    cache: CacheSpec = Field(default_factory=CacheSpec)


class StorageSpec(_Model):
    root: str = Field(DEFAULT_ROOT, description="Local path, file:// or s3:// URI.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options (endpoint_url, key, secret, ...); AWS_* env vars also work.",
    )
    retries: int = Field(
        6, ge=0, le=20, description="Retries of a transient storage error (backoff 0.5 s to 8 s)."
    )

    @field_validator("root")
    @classmethod
    def _root_scheme(cls, value: str) -> str:
        if "://" in value:
            scheme = value.split("://", 1)[0]
            if scheme not in {"file", "s3", "memory"}:
                raise ValueError(
                    f"storage root scheme {scheme!r} is not supported; use a path, file:// or s3://"
                )
        return value


class TrackingSpec(_Model):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default: a SQLite store under the storage root (local roots)."
    )
    experiment: str | None = Field(None, description="MLflow experiment; default: the pipeline name.")
    enabled: bool = True


class RaySpec(_Model):
    address: str | None = Field(None, description="Ray cluster address; default: start a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray cmflow starts.")


class PipelineSpec(_Model):
    name: str
    description: str = ""
    seed: int = Field(0, ge=0)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    stages: dict[str, StageSpec]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "pipeline name")

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: dict[str, StageSpec]) -> dict[str, StageSpec]:
        if not value:
            raise ValueError("a pipeline needs at least one stage")
        for name in value:
            _check_name(name, "stage name")
        return value

    def topological_order(self) -> list[str]:
        """Stage names in dependency order (declaration order among independent stages)."""
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join(path[path.index(name) :] + [name])
                raise SpecError(f"stages form a cycle: {cycle}; remove one of these inputs")
            state[name] = 1
            for upstream in self.stages[name].inputs.values():
                visit(upstream, path + [name])
            state[name] = 2
            order.append(name)

        for name in self.stages:
            visit(name, [])
        return order

    def downstream_of(self, names: Iterable[str]) -> set[str]:
        """``names`` and every stage that depends on them, transitively."""
        found = set(names)
        changed = True
        while changed:
            changed = False
            for name, stage in self.stages.items():
                if name not in found and found.intersection(stage.inputs.values()):
                    found.add(name)
                    changed = True
        return found

    def redacted(self) -> dict[str, Any]:
        """JSON-able snapshot with secrets (storage options, URI passwords) replaced by '***'."""
        return redact(self.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------------
# Loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value). Values are YAML/JSON scalars or lists."""
    if "=" not in item:
        raise SpecError(f"--set {item!r} is not KEY=VALUE; write e.g. --set stages.distill.params.lr=2e-4")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise SpecError(f"--set {item!r} has an empty key part; write e.g. --set seed=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 as a string
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to the raw (unvalidated) spec dict; validation runs afterwards."""
    data = json.loads(json.dumps(raw))  # deep copy, and JSON-safe
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                if part not in node and i == 1 and parts[0] == "stages":
                    known = ", ".join(sorted(data.get("stages", {})))
                    raise SpecError(f"--set {item!r}: there is no stage {part!r}; stages are: {known}")
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise SpecError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(
            f"spec file {str(path)!r} does not exist; pass a YAML file such as pipelines/digits.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError(f"{path}: {problem}{where}; fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file; pass a YAML spec") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the top level must be a mapping with 'name' and 'stages'")
    return data
