"""Released models in pipelines: an openai EDM ``.pt`` as the teacher (sampling, distillation) and an
imported diffusers consistency model measured by ``evaluate``, on 8x8 digits (an ADM of the released
block structure at that size; the full-size numerics are in tests/interop)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from released_helpers import DIGITS_ADM, diffusers_pipeline_folder, random_adm, save_released
from stage_helpers import artifact, run_stage

from cmflow.models import diffusers_format as dfmt
from cmflow.models.io import load_model
from cmflow.storage import Manifest, Storage

# the digits ADM described to the loader as the ImageNet-64 preset with overrides (what `unet:` holds)
OVERRIDES = {k: v for k, v in asdict(DIGITS_ADM).items() if k not in ("dropout",)}


@pytest.fixture(scope="module")
def labelled_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Storage, Manifest]:
    storage = Storage(str(tmp_path_factory.mktemp("released") / "store"))
    data = run_stage(
        storage, "prepare_data", {"source": "sklearn-digits", "max_images": 128, "use_labels": True}
    )
    return storage, data


def test_openai_teacher_samples_and_distils(
    labelled_digits: tuple[Storage, Manifest], tmp_path: Path
) -> None:
    from cmflow.data.shards import read_dataset
    from cmflow.diffusion.losses import CDLoss
    from cmflow.models.precond import CMPrecond
    from cmflow.training import loop

    storage, data = labelled_digits
    released = random_adm(DIGITS_ADM, seed=1)
    path = save_released(tmp_path / "edm_digits_ema.pt", released)
    teacher = run_stage(
        storage,
        "teacher",
        {
            "uri": str(path),
            "format": "auto",
            "preset": "adm-imagenet64",
            "unet": OVERRIDES,
            "grid_samples": 4,
        },
        {"data": data},
    )
    config = artifact(storage, teacher).read_json("model.json")
    assert (
        config["kind"] == "edm"
        and config["backbone"] == "adm"
        and config["precond"]["c_noise_scale"] == 250.0
    )
    assert config["adm"]["num_classes"] == 10 and config["source"] == "uri"
    model = load_model(artifact(storage, teacher).read_bytes("model.safetensors"), config)
    for key, value in released.state_dict().items():  # the file's tensors, unchanged
        assert torch.equal(model.backbone.state_dict()[key], value), key

    samples = run_stage(
        storage,
        "teacher_sample",
        {"num_samples": 6, "num_steps": 2, "batch_size": 3, "class_labels": "uniform"},
        {"teacher": teacher},
    )
    assert samples.meta["num_images"] == 6 and samples.meta["nfe"] == 3

    # consistency distillation from the released teacher: theta <- phi, a few CD steps (CM Alg. 2)
    student = CMPrecond.from_edm(model).requires_grad_(True)
    assert student.c_noise_scale == 250.0 and isinstance(student.backbone, type(model.backbone))
    x, y, _ = read_dataset(artifact(storage, data).read_bytes)
    cfg = loop.OptimConfig(lr=1e-4)
    state = loop.TrainState(
        student,
        loop.frozen_copy(student),
        loop.make_optimizer(student.parameters(), cfg),
        target=loop.frozen_copy(student),
    )
    sampler = loop.ArrayBatches(x, y, 8, seed=0)
    step = loop.cd_step(CDLoss(18), model.requires_grad_(False), sampler, cfg, mu=0.95, ema_rate=0.9)
    before = [p.detach().clone() for p in student.parameters()]
    rows: list[dict[str, float]] = []
    loop.run_loop(
        state, step, total_steps=3, images_per_step=8, log_every=1, hooks=loop.LoopHooks(on_log=rows.append)
    )
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_imported_diffusers_model_is_evaluated(
    labelled_digits: tuple[Storage, Manifest], tmp_path: Path
) -> None:
    storage, data = labelled_digits
    folder = diffusers_pipeline_folder(
        tmp_path / "pipe", dfmt.unet_config(DIGITS_ADM), num_train_timesteps=18
    )
    imported = run_stage(storage, "import_model", {"uri": str(folder), "two_step_sigma": 0.8})
    config = artifact(storage, imported).read_json("model.json")
    assert (
        config["kind"] == "cm"
        and config["backbone"] == "adm"
        and config["sampling"]["two_step_sigmas"] == [80.0, 0.8]
    )
    assert config["diffusers"] == {"num_train_timesteps": 18} and imported.meta["source"] == "diffusers"
    params = {"num_samples": 24, "seeds": [0], "midpoint": "model", "kid_subsets": 2, "grid_size": 2}
    report = run_stage(storage, "evaluate", params, {"data": data, "model": imported})
    assert (
        report.meta["fid_1step"] > 0 and report.meta["fid_2step"] > 0 and report.meta["midpoint_sigma"] == 0.8
    )


def test_teacher_stage_trains_an_adm_teacher(
    ray_module: None, labelled_digits: tuple[Storage, Manifest]
) -> None:
    """An adm-* preset trains the released architecture from scratch (c_noise = 250 ln sigma, as they were)."""
    storage, data = labelled_digits
    params = {"preset": "adm-imagenet64", "unet": OVERRIDES, "steps": 2, "batch_size": 8, "grid_samples": 0}
    trained = run_stage(storage, "teacher", {**params, "checkpoint_every": 0}, {"data": data})
    config = artifact(storage, trained).read_json("model.json")
    assert config["backbone"] == "adm" and config["precond"]["c_noise_scale"] == 250.0
    assert config["adm"] == {**asdict(DIGITS_ADM), "channel_mult": [1, 2], "attn_resolutions": [4]}
    assert trained.meta["steps"] == 2 and trained.meta["final_loss"] > 0
