"""Helpers of the registry tests: tiny model / report artifacts and a runner for one stage task."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Any

from cmflow.storage import Manifest, Storage


def commit(storage: Storage, kind: str, folder: Path, meta: dict[str, Any] | None = None) -> Manifest:
    """Commit ``folder`` as an artifact of ``kind`` under a fresh key."""
    return storage.commit(kind, uuid.uuid4().hex * 2, folder, meta=meta or {})


def make_model(folder: Path, seed: int = 0, channels: int = 1, **extra: Any) -> Path:
    """A tiny 8x8 consistency model with slightly perturbed weights (a fresh UNet outputs exactly 0)."""
    import torch

    from cmflow.models import CMPrecond, make_unet
    from cmflow.models.io import save_model

    torch.manual_seed(seed)
    model = CMPrecond(make_unet("tiny", 8, channels))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(model, folder, **extra)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def manifest_text(manifest: Manifest) -> str:
    data = json.loads(manifest.to_json())
    data["uri"] = manifest.uri
    return json.dumps(data)


def run_task(
    storage: Storage,
    kind: str,
    params: dict[str, Any],
    inputs: dict[str, Manifest],
    tracking: dict[str, Any] | None = None,
) -> Manifest:
    """Run one stage through the engine's worker code (:func:`execute_stage`) in this process."""
    from cmflow.engine.worker import StageTask, execute_stage
    from cmflow.spec import Resources
    from cmflow.stages.table import STAGES

    validated = STAGES[kind].params_model.model_validate(params).model_dump(mode="json")
    task = StageTask(
        run_id=unique("test-run"),
        stage=kind,
        kind=kind,
        params=validated,
        cache_key=uuid.uuid4().hex * 2,
        components={},
        seed=0,
        resources=Resources(),
        storage_root=storage.root,
        storage_options=storage.options,
        inputs={name: manifest_text(m) for name, m in inputs.items()},
        tracking=tracking,
    )
    data = json.loads(execute_stage(task))
    data.pop("node_id", None)  # the worker adds where it ran; the driver pops it the same way
    return Manifest.from_json(json.dumps(data))
