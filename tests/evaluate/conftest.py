"""Fixtures of the evaluate tests: a digits dataset artifact, tiny untrained CM / EDM models, a context."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cmflow.spec import Resources
from cmflow.stage import Artifact, StageContext
from cmflow.storage import Storage


def commit_folder(
    storage: Storage, kind: str, key: str, folder: Path, meta: dict[str, Any] | None = None
) -> Artifact:
    """Commit ``folder`` as an artifact and return it as a stage input."""
    return Artifact(storage, storage.commit(kind, key, folder, meta=meta or {}))


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One thread: these tiny workloads run several times faster on a shared 2-core machine."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):  # numpy's BLAS too (FID eigh, KID / precision-recall matrix products)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as uint8 (N, 1, 8, 8) and their labels (as prepare_data makes them)."""
    from cmflow.data.sources import read_sklearn_digits

    return read_sklearn_digits()


@pytest.fixture()
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "store"))


@pytest.fixture()
def make_dataset(storage: Storage, tmp_path: Path) -> Callable[..., Artifact]:
    """Commit a dataset artifact (prepare_data format) of the given images."""
    from cmflow.data.shards import dataset_meta, write_dataset

    def make(images: np.ndarray, labels: np.ndarray | None = None, name: str = "data") -> Artifact:
        folder = tmp_path / f"in-{name}"
        folder.mkdir()
        info = write_dataset(
            folder, images, labels, source="test", num_classes=10 if labels is not None else 0
        )
        return commit_folder(
            storage, "prepare_data", f"{name}-{info['digest'][:16]}", folder, dataset_meta(info)
        )

    return make


@pytest.fixture()
def make_model(storage: Storage, tmp_path: Path) -> Callable[..., Artifact]:
    """Commit an untrained tiny model artifact: kind "cm" (CMPrecond) or "edm" (EDMPrecond)."""
    import torch

    from cmflow.models import CMPrecond, EDMPrecond, make_unet
    from cmflow.models.io import save_model

    def make(kind: str, seed: int = 0, **extra: Any) -> Artifact:
        torch.manual_seed(seed)
        backbone = make_unet("tiny", 8, 1)
        model = CMPrecond(backbone) if kind == "cm" else EDMPrecond(backbone)
        folder = tmp_path / f"model-{kind}-{seed}-{len(extra)}"
        save_model(model, folder, **extra)
        return commit_folder(storage, kind, f"{kind}-{seed}-{len(extra)}", folder)

    return make


@pytest.fixture()
def make_ctx(storage: Storage, tmp_path: Path) -> Callable[..., StageContext]:
    """A hand-made StageContext (1 CPU) with a fresh out_dir and a recording reporter (``ctx.updates``)."""
    counter = iter(range(1000))

    def make(cache_key: str = "k" * 64, storage_override: Storage | None = None) -> StageContext:
        out = tmp_path / f"out-{next(counter)}"
        out.mkdir()
        updates: list[dict[str, Any]] = []
        ctx = StageContext(
            run_id="test-run",
            stage="evaluate",
            kind="evaluate",
            cache_key=cache_key,
            seed=0,
            out_dir=out,
            storage=storage_override or storage,
            resources=Resources(cpus=1),
            reporter=lambda stage, update: updates.append(dict(update)),
        )
        ctx.updates = updates  # type: ignore[attr-defined]
        return ctx

    return make
