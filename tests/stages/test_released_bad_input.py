"""Bad released models: one line naming the problem and the fix, exit 2, no traceback, nothing written.

The pattern of tests/reliability/test_bad_input.py, for issue 15's cases: a checkpoint of another
architecture or resolution (the first mismatching key and both shapes), a ``.pt`` that needs unpickling
code (refused; the payload never runs), a diffusers folder with another scheduler or model class, class
labels given to an unconditional model, and an export of a backbone diffusers has no equivalent for.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from released_helpers import DIGITS_ADM, REDUCED_64, diffusers_pipeline_folder, random_adm, save_released
from stage_helpers import committed, run_stage

from cmflow.cli.main import main
from cmflow.errors import StageError
from cmflow.models import diffusers_format as dfmt
from cmflow.storage import Storage

MARKER = "/tmp/cmflow-interop-pickle-ran"
DIGITS_SETS = [f"--set={k}={list(v) if isinstance(v, tuple) else v}" for k, v in asdict(DIGITS_ADM).items()]


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {MARKER}",))


def _evil_pt(tmp: Path) -> Path:
    path = tmp / "edm_imagenet64_ema.pt"
    path.write_bytes(pickle.dumps({"time_embed.0.weight": _RunsCode()}, protocol=2))  # torch.save's protocol
    return path


def _digits_pt(tmp: Path, **changes: object) -> Path:
    return save_released(tmp / "cd_digits.pt", random_adm(replace(DIGITS_ADM, **changes), seed=0))


def _folder(tmp: Path, edit: Callable[[Path], None] | None = None, **unet: object) -> Path:
    folder = diffusers_pipeline_folder(tmp / "pipe", {**dfmt.unet_config(DIGITS_ADM), **unet})
    if edit is not None:
        edit(folder)
    return folder


def _edit_json(name: str, **changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _registered(tmp: Path, tracking: list[str], folder: Path, name: str) -> None:
    assert main(["models", "import", str(folder), "--name", name, *tracking]) == 0


def _cmflow_unet_model(tmp: Path, tracking: list[str]) -> None:
    """A cmflow-UNet CM registered the way the register stage does."""
    from cmflow.mlflow_client import client_for, experiment_id
    from cmflow.models import CMPrecond, make_unet
    from cmflow.models.io import save_model
    from cmflow.registry import register_version

    folder = tmp / "unet-cm"
    save_model(CMPrecond(make_unet("tiny", 8, 1)), folder)
    client = client_for(tracking[1])
    exp = experiment_id(client, "bad")
    run = client.create_run(exp)
    register_version(
        client,
        name="unet-cm",
        run_id=run.info.run_id,
        experiment_id=exp,
        weights=folder / "model.safetensors",
        config=folder / "model.json",
        tags={"cmflow.cache_key": "k"},
    )


# name, argv(tmp, tracking) -> list, pattern of the one line
CLI_CASES: list[tuple[str, Callable[[Path, list[str]], list[str]], str]] = [
    (
        "other-architecture",
        lambda t, tr: [
            "models",
            "import",
            str(_digits_pt(t)),
            "--format",
            "openai",
            "--name",
            "x",
            "--preset",
            "adm-imagenet64",
            *tr,
        ],
        r"another architecture or resolution: key time_embed\.0\.weight has shape \(128, 32\) in the checkpoint but "
        r"\(768, 192\) in the model \(preset adm-imagenet64\); pick the matching preset",
    ),
    (
        "other-resolution",  # the same weights described at 16 px: attention moves off the 4x4 level
        lambda t, tr: [
            "models",
            "import",
            str(_digits_pt(t)),
            "--name",
            "x",
            "--preset",
            "adm-imagenet64",
            *DIGITS_SETS,
            "--set=img_resolution=16",
            *tr,
        ],
        r"key output_blocks\.1\.1\.in_layers\.0\.weight \(shape \(64,\)\) is missing from the checkpoint",
    ),
    (
        "pickle-with-code",
        lambda t, tr: ["models", "import", str(_evil_pt(t)), "--name", "x", *tr],
        r"was refused: it is not a weights-only state dict",
    ),
    (
        "diffusers-other-scheduler",
        lambda t, tr: [
            "models",
            "import",
            str(
                _folder(t, _edit_json("model_index.json", scheduler=["diffusers", "EulerDiscreteScheduler"]))
            ),
            "--name",
            "x",
            *tr,
        ],
        r"describes a ConsistencyModelPipeline with a UNet2DModel and a EulerDiscreteScheduler; only a "
        r"ConsistencyModelPipeline with a UNet2DModel and a CMStochasticIterativeScheduler imports",
    ),
    (
        "diffusers-other-model-class",
        lambda t, tr: [
            "models",
            "import",
            str(_folder(t, _edit_json("model_index.json", unet=["diffusers", "UNet2DConditionModel"]))),
            "--name",
            "x",
            *tr,
        ],
        r"with a UNet2DConditionModel and a CMStochasticIterativeScheduler; only a ConsistencyModelPipeline with a UNet2DModel",
    ),
    (
        "diffusers-unet-not-adm",
        lambda t, tr: ["models", "import", str(_folder(t, downsample_type="conv")), "--name", "x", *tr],
        r"downsample_type is 'conv'; an ADM consistency model has 'resnet'",
    ),
    (
        "class-labels-to-unconditional",
        lambda t, tr: [
            *(_registered(t, tr, _folder(t, num_class_embeds=None), "uncond") or []),
            "sample",
            "models:/uncond@challenger",
            "--class-label",
            "3",
            "--out",
            str(t / "g.png"),
            *tr,
        ],
        r"this model is unconditional; leave class_labels out",
    ),
    (
        "export-cmflow-unet",
        lambda t, tr: [
            *(_cmflow_unet_model(t, tr) or []),
            "models",
            "export",
            "unet-cm@challenger",
            "--out",
            str(t / "out"),
            *tr,
        ],
        r"has the 'unet' backbone, which has no diffusers equivalent; only models with the adm backbone export",
    ),
]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """One SQLite MLflow store for the CLI cases (each checks that its own case registered nothing)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('bad-mlflow')}/mlflow.db"
    # create the store through the CLI: it quiets MLflow's logging before MLflow is first imported, as for a user
    assert main(["models", "list", "--tracking-uri", uri]) == 0
    return ["--tracking-uri", uri]


@pytest.mark.parametrize(("name", "argv", "pattern"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_released_model(
    tmp_path: Path,
    tracking: list[str],
    capsys: pytest.CaptureFixture[str],
    name: str,
    argv: Callable[[Path, list[str]], list[str]],
    pattern: str,
) -> None:
    from cmflow.mlflow_client import client_for

    if os.path.exists(MARKER):
        os.unlink(MARKER)
    args = argv(tmp_path, tracking)  # may register a model the case needs
    versions_before = len(client_for(tracking[1]).search_model_versions(""))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert len(client_for(tracking[1]).search_model_versions("")) == versions_before, "bad input registered"
    assert not (tmp_path / "out").exists() and not (tmp_path / "g.png").exists(), "bad input wrote a file"
    assert not os.path.exists(MARKER), "an unpickled payload ran code"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Storage, object]:
    storage = Storage(str(tmp_path_factory.mktemp("bad-released") / "store"))
    data = run_stage(
        storage, "prepare_data", {"source": "sklearn-digits", "max_images": 32, "use_labels": True}
    )
    return storage, data


# name, teacher params(tmp), pattern; the teacher stage on 8x8 digits
TEACHER_CASES: list[tuple[str, Callable[[Path], dict], str]] = [
    ("pickle-with-code", lambda t: {"uri": str(_evil_pt(t)), "format": "openai"}, r"was refused"),
    (
        "other-architecture",
        lambda t: {
            "uri": str(_digits_pt(t, num_classes=0)),
            "preset": "adm-imagenet64",
            "unet": {k: v for k, v in asdict(DIGITS_ADM).items()},
        },
        r"key label_emb\.weight \(shape \(10, 128\)\) is missing from the checkpoint",
    ),
    (
        "other-resolution",  # a 64 px ImageNet-layout teacher for 8x8 data
        lambda t: {
            "uri": str(save_released(t / "edm64.pt", random_adm(REDUCED_64))),
            "preset": "adm-imagenet64",
            "unet": {"model_channels": 32, "num_res_blocks": 1, "num_head_channels": 32, "num_classes": 0},
        },
        r"is a model of 3x64x64 images but the data is 1x8x8",
    ),
    (
        "truncated",
        lambda t: {"uri": str(_truncated(t)), "format": "openai"},
        r"not a readable torch checkpoint",
    ),
]


def _truncated(tmp: Path) -> Path:
    path = _digits_pt(tmp)
    path.write_bytes(path.read_bytes()[:4000])
    return path


@pytest.mark.parametrize(("name", "params", "pattern"), TEACHER_CASES, ids=[c[0] for c in TEACHER_CASES])
def test_teacher_stage_bad_released_file(
    digits: tuple[Storage, object], tmp_path: Path, name: str, params: Callable[[Path], dict], pattern: str
) -> None:
    storage, data = digits
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    with pytest.raises(StageError) as info:
        run_stage(storage, "teacher", {**params(tmp_path), "grid_samples": 0}, {"data": data})
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and re.search(pattern, message), message
    assert committed(storage, "teacher") == []
    assert not os.path.exists(MARKER), "an unpickled payload ran code"


def test_class_labels_for_an_unconditional_teacher_are_refused(
    digits: tuple[Storage, object], tmp_path: Path
) -> None:
    storage, data = digits
    sets = {k: v for k, v in asdict(replace(DIGITS_ADM, num_classes=0)).items()}
    path = _digits_pt(tmp_path, num_classes=0)
    teacher = run_stage(
        storage,
        "teacher",
        {"uri": str(path), "preset": "adm-imagenet64", "unet": sets, "grid_samples": 0},
        {"data": data},
    )
    with pytest.raises(
        StageError, match=r"the teacher is unconditional, so it takes no class labels; remove class_labels"
    ):
        run_stage(
            storage,
            "teacher_sample",
            {"num_samples": 2, "num_steps": 2, "class_labels": 3},
            {"teacher": teacher},
        )
    assert committed(storage, "teacher_sample") == []
