"""Fixtures of the registry tests (helpers live in registry_helpers.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import commit, make_model, unique

from cmflow.storage import Manifest, Storage


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny 8x8 models: intra-op threads only add synchronisation (40 ms per conv on a busy 2-core box)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "store"))


@pytest.fixture()
def model_artifact(storage: Storage, tmp_path: Path) -> Callable[..., Manifest]:
    """``model_artifact(seed=0, channels=1, **model_json_extra)`` -> a committed train_cm-like artifact."""

    def make(seed: int = 0, channels: int = 1, **extra: Any) -> Manifest:
        folder = make_model(tmp_path / unique("model"), seed, channels, **extra)
        return commit(storage, "train_cm", folder, {"steps": 0, "seed": seed})

    return make


@pytest.fixture()
def report_artifact(storage: Storage, tmp_path: Path) -> Callable[..., Manifest]:
    """``report_artifact(fid_1step, ...)`` -> a committed evaluate-like artifact (report.json + meta)."""

    def make(fid_1step: float, fid_2step: float | None = None, ref: str = "ref-digest-a") -> Manifest:
        folder = tmp_path / unique("report")
        folder.mkdir()
        meta = {
            "fid_1step": fid_1step,
            "fid_2step": fid_2step or fid_1step * 0.8,
            "fid_teacher": 3.0,
            "nfe_1step": 1,
            "nfe_2step": 2,
            "nfe_teacher": 35,
            "ref_stats_digest": ref,
        }
        (folder / "report.json").write_text(json.dumps({"fid": {"1": fid_1step}, **meta}))
        return commit(storage, "evaluate", folder, meta)

    return make
