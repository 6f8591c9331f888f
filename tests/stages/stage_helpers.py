"""Helpers for the stage tests: run one stage the way the engine's worker does (build ctx, call, commit)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from cmflow.engine.worker import StageTask, execute_stage
from cmflow.spec import Resources
from cmflow.stage import Artifact, StageContext
from cmflow.stages.table import STAGES
from cmflow.storage import Manifest, Storage


def run_stage(
    storage: Storage,
    kind: str,
    params: dict[str, Any],
    inputs: dict[str, Manifest] | None = None,
    *,
    resources: Resources | None = None,
    stage: str | None = None,
) -> Manifest:
    """Run ``kind`` through :func:`execute_stage` (in this process) and return the committed manifest."""
    definition = STAGES[kind]
    validated = definition.params_model.model_validate(params).model_dump(mode="json")
    task = StageTask(
        run_id="test-run",
        stage=stage or kind,
        kind=kind,
        params=validated,
        cache_key=uuid.uuid4().hex + uuid.uuid4().hex,
        components={},
        seed=0,
        resources=resources or Resources(),
        storage_root=storage.root,
        storage_options=storage.options,
        inputs={name: _manifest_text(m) for name, m in (inputs or {}).items()},
    )
    data = json.loads(execute_stage(task))
    data.pop("node_id", None)  # the worker adds where it ran (the driver pops it the same way)
    return Manifest.from_json(json.dumps(data))


def _manifest_text(manifest: Manifest) -> str:
    data = json.loads(manifest.to_json())
    data["uri"] = manifest.uri
    return json.dumps(data)


def direct_ctx(
    storage: Storage, tmp_path: Path, kind: str, *, resources: Resources | None = None
) -> StageContext:
    """A hand-made context for calling a stage function directly (what tests of errors need)."""
    out = tmp_path / f"out-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    key = uuid.uuid4().hex + uuid.uuid4().hex
    return StageContext(
        run_id="test-run",
        stage=kind,
        kind=kind,
        cache_key=key,
        seed=0,
        out_dir=out,
        storage=storage,
        resources=resources or Resources(),
        work_uri=storage.uri(Storage.work_prefix(kind, key)),
    )


def artifact(storage: Storage, manifest: Manifest) -> Artifact:
    return Artifact(storage, manifest)


def committed(storage: Storage, kind: str) -> list[str]:
    """Cache keys with a manifest under ``artifacts/<kind>/`` (what a failed stage must not leave)."""
    found = []
    for prefix in storage.list(f"artifacts/{kind}"):
        for key in storage.list(f"artifacts/{kind}/{prefix}"):
            if storage.exists(f"artifacts/{kind}/{prefix}/{key}/manifest.json"):
                found.append(key)
    return found
