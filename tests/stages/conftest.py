"""Fixtures of the stage tests (helpers live in stage_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from stage_helpers import run_stage

from cmflow.storage import Manifest, Storage


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """One intra-op thread: on a shared 2-core machine, 2 spinning threads per test process are much slower."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture()
def local_storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "store"))


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Storage, Manifest]:
    """A local store holding a prepared 256-image digits dataset (shared by the tests of a module)."""
    storage = Storage(str(tmp_path_factory.mktemp("digits") / "store"))
    manifest = run_stage(
        storage, "prepare_data", {"source": "sklearn-digits", "max_images": 256, "use_labels": False}
    )
    return storage, manifest


@pytest.fixture(scope="module")
def tiny_teacher(ray_module: None, digits_store: tuple[Storage, Manifest]) -> Manifest:
    """A tiny EDM teacher trained for a few steps on ``digits_store`` (one Ray Train worker)."""
    storage, data = digits_store
    return run_stage(
        storage,
        "teacher",
        {"preset": "tiny", "steps": 8, "batch_size": 16, "grid_samples": 4, "checkpoint_every": 4},
        {"data": data},
    )
