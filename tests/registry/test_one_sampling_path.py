"""One seed, one image: teacher_sample, evaluate, the training stages' grids and the served model share the
sampling path (:mod:`cmflow.diffusion.generate`), so they draw the same latents, labels and multistep noise.

Each path is taken through its own entry point: ``teacher_sample`` through the engine's worker code,
``evaluate`` through the sampler it builds for every setting, the served model through MLflow's pyfunc loader
(the logged code file, weights and config), the grids through ``sample_range``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from registry_helpers import commit, run_task, unique

from cmflow.storage import Storage

SEEDS = 6


def tiny_model(folder: Path, kind: str, num_classes: int, seed: int) -> Path:
    """A tiny 8x8 EDM denoiser or CM with perturbed weights (a fresh UNet outputs exactly zero)."""
    import torch

    from cmflow.models import CMPrecond, EDMPrecond, make_unet
    from cmflow.models.io import save_model

    torch.manual_seed(seed)
    backbone = make_unet("tiny", 8, 1, num_classes=num_classes)
    model = (EDMPrecond if kind == "edm" else CMPrecond)(backbone)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(model, folder, **({"sampling": {"two_step_sigmas": [80.0, 0.8]}} if kind == "cm" else {}))
    return folder


def served(folder: Path, tmp_path: Path) -> Any:
    """The pyfunc model as ``mlflow models serve`` loads it (cmflow's logged code file + artifacts)."""
    import mlflow.pyfunc

    from cmflow import serving

    path = tmp_path / unique("pyfunc")
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(serving.CODE_FILE),
        artifacts={"weights": str(folder / "model.safetensors"), "config": str(folder / "model.json")},
        pip_requirements=["torch"],
    )
    return mlflow.pyfunc.load_model(str(path))


def evaluate_images(folder: Path, kind: str, **kwargs: Any) -> np.ndarray:
    """The images of seeds 0.. as evaluate's measuring tasks draw them (``Work`` items, 4 per batch)."""
    from cmflow.stages.evaluate.work import ExtractorRef, NetRef, Work, _images

    config = json.loads((folder / "model.json").read_text())
    net = NetRef((folder / "model.safetensors").read_bytes(), config, unique("sha"))
    sampling = {"method": kind, "shape": (1, 8, 8), "num_classes": config["num_classes"], **kwargs}
    work = Work(ExtractorRef("digits", None, "shipped"), 0, SEEDS, net=net, sampling=sampling, batch_size=4)
    return np.concatenate(list(_images(work, "cpu")))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_a_teacher_seed_gives_one_image_in_teacher_sample_evaluate_and_serving(
    storage: Storage, tmp_path: Path, num_classes: int
) -> None:
    folder = tiny_model(tmp_path / unique("edm"), "edm", num_classes, seed=1)
    teacher = commit(storage, "teacher", folder)
    params = {"num_samples": SEEDS, "num_steps": 6, "batch_size": 4}
    if num_classes:
        params["class_labels"] = "uniform"
    samples = run_task(storage, "teacher_sample", params, {"teacher": teacher})
    from cmflow.data.shards import read_dataset
    from cmflow.stage import Artifact

    from_stage = read_dataset(Artifact(storage, samples).read_bytes)[0]
    from_evaluate = evaluate_images(folder, "edm", num_steps=6)
    from_server = served(folder, tmp_path).predict({"num_samples": SEEDS, "steps": 6, "seed": 0})
    assert from_stage.shape == (SEEDS, 1, 8, 8) and len(np.unique(from_stage)) > 10
    np.testing.assert_array_equal(from_evaluate, from_stage)
    np.testing.assert_array_equal(from_server, from_stage)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_a_cm_seed_gives_one_image_in_evaluate_serving_and_the_grids(
    tmp_path: Path, num_classes: int
) -> None:
    from cmflow.diffusion.generate import sample_range
    from cmflow.models.io import load_model

    folder = tiny_model(tmp_path / unique("cm"), "cm", num_classes, seed=2)
    model = served(folder, tmp_path)
    for sigmas in ([80.0], [80.0, 0.8]):
        from_evaluate = evaluate_images(folder, "cm", sigmas=list(sigmas))
        from_server = model.predict({"num_samples": SEEDS, "steps": len(sigmas), "seed": 0})
        grid, _ = sample_range(
            load_model(folder / "model.safetensors", folder / "model.json"),
            0,
            SEEDS,
            4,
            shape=(1, 8, 8),
            method="cm",
            sigmas=sigmas,
            num_classes=num_classes,
        )
        np.testing.assert_array_equal(from_server, from_evaluate)
        np.testing.assert_array_equal(grid, from_evaluate)
    assert not np.array_equal(evaluate_images(folder, "cm", sigmas=[80.0]), from_evaluate)
