"""``cmflow models import`` / ``export`` against a real MLflow store: released files in, sample, edit,
pyfunc, diffusers folder out (8x8 ADMs of the released block structure, random weights)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from released_helpers import DIGITS_ADM, diffusers_pipeline_folder, random_adm, save_released

from cmflow.cli.main import main
from cmflow.mlflow_client import client_for
from cmflow.models import diffusers_format as dfmt

SETS = [f"--set={k}={list(v) if isinstance(v, tuple) else v}" for k, v in asdict(DIGITS_ADM).items()]


@pytest.fixture()
def tracking(tmp_path: Path) -> list[str]:
    return ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]


def test_import_openai_file_then_sample_edit_and_export(
    tmp_path: Path, tracking: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("diffusers")
    from diffusers import ConsistencyModelPipeline

    from cmflow.registry import load_pyfunc

    released = save_released(tmp_path / "cd_digits_l2.pt", random_adm(DIGITS_ADM, seed=2))
    argv = [
        "models",
        "import",
        str(released),
        "--format",
        "openai",
        "--name",
        "cd-released",
        "--preset",
        "adm-imagenet64",
    ]
    assert main([*argv, *SETS, "--two-step-sigma", "0.8", *tracking]) == 0
    assert "registered cd-released v1 (alias challenger)" in capsys.readouterr().out
    assert main([*argv, *SETS, *tracking]) == 0  # the same file again: the same version
    client = client_for(tracking[1])
    versions = client.search_model_versions("name = 'cd-released'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].tags["cmflow.backbone"] == "adm"

    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "models:/cd-released@challenger",
                "-n",
                "4",
                "--steps",
                "2",
                "--class-label",
                "3",
                "--out",
                str(grid),
                *tracking,
            ]
        )
        == 0
    )
    assert Image.open(grid).size[0] > 8
    image = tmp_path / "digit.npy"
    np.save(image, np.full((1, 1, 8, 8), 128, np.uint8))
    mask = tmp_path / "mask.npy"
    np.save(mask, np.eye(8, dtype=np.uint8)[None, None])
    edited = tmp_path / "edited.png"
    assert (
        main(
            [
                "edit",
                "inpaint",
                "models:/cd-released@challenger",
                "--image",
                str(image),
                "--mask",
                str(mask),
                "--steps",
                "3",
                "--out",
                str(edited),
                *tracking,
            ]
        )
        == 0
    )
    assert edited.is_file()
    pyfunc = load_pyfunc("models:/cd-released@challenger", tracking[1])  # what `mlflow models serve` loads
    out = pyfunc.predict([{"num_samples": 2, "steps": 1, "seed": 0, "class_labels": [1]}])
    assert out.shape == (2, 1, 8, 8) and out.dtype == np.uint8

    folder = tmp_path / "exported"
    assert (
        main(
            [
                "models",
                "export",
                "cd-released@challenger",
                "--format",
                "diffusers",
                "--out",
                str(folder),
                *tracking,
            ]
        )
        == 0
    )
    pipe = ConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.num_train_timesteps == 40 and pipe.unet.config.num_class_embeds == 10
    images = pipe(batch_size=2, class_labels=[1, 2], num_inference_steps=1, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_import_diffusers_folder(tmp_path: Path, tracking: list[str]) -> None:
    pytest.importorskip("diffusers")
    config = {**dfmt.unet_config(DIGITS_ADM), "num_class_embeds": None}
    folder = diffusers_pipeline_folder(tmp_path / "pipe", config, num_train_timesteps=151)
    assert main(["models", "import", str(folder), "--name", "ct-released", *tracking]) == 0
    out = tmp_path / "again"
    assert main(["models", "export", "models:/ct-released/1", "--out", str(out), *tracking]) == 0
    assert '"num_train_timesteps": 151' in (out / "scheduler" / "scheduler_config.json").read_text()
