"""teacher: training, resuming from its work checkpoint, loading from a URI (file and S3, refusing pickles
with code and weights of another architecture); teacher_sample: the same images for any number of tasks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_helpers import artifact, direct_ctx, run_stage

from cmflow.data.shards import read_dataset
from cmflow.errors import InputError
from cmflow.models.io import load_model
from cmflow.stages.teacher import TeacherParams, TeacherSampleParams, teacher, teacher_sample
from cmflow.storage import Manifest, Storage


def _export(storage: Storage, manifest: Manifest, folder: Path, weights: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    art = artifact(storage, manifest)
    (folder / "model.json").write_bytes(art.read_bytes("model.json"))
    (folder / weights).write_bytes(art.read_bytes("model.safetensors"))
    return folder


def test_trained_teacher_artifact(digits_store: tuple[Storage, Manifest], tiny_teacher: Manifest) -> None:
    storage, _ = digits_store
    assert sorted(tiny_teacher.files) == [
        "metrics.jsonl",
        "model.json",
        "model.safetensors",
        "raw.safetensors",
        "samples.png",
    ]
    art = artifact(storage, tiny_teacher)
    config = art.read_json("model.json")
    assert config["kind"] == "edm" and config["image"] == {"channels": 1, "resolution": 8}
    assert tiny_teacher.meta["steps"] == 8 and tiny_teacher.meta["params_count"] > 0
    ema = load_model(art.read_bytes("model.safetensors"), config)
    raw = load_model(art.read_bytes("raw.safetensors"), config)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(ema.state_dict().values(), raw.state_dict().values(), strict=True)
    )
    rows = [line for line in art.read_bytes("metrics.jsonl").decode().splitlines() if line]
    assert len(rows) >= 1


def test_rerun_with_the_same_key_resumes_from_the_work_checkpoint(
    ray_session: None, digits_store: tuple[Storage, Manifest], tmp_path: Path
) -> None:
    storage, data = digits_store
    params = TeacherParams(preset="tiny", steps=6, batch_size=16, checkpoint_every=3, grid_samples=0)
    first = direct_ctx(storage, tmp_path, "teacher")
    first_meta = teacher(params, {"data": artifact(storage, data)}, first)
    second = direct_ctx(storage, tmp_path, "teacher")
    second.cache_key = first.cache_key
    second_meta = teacher(params, {"data": artifact(storage, data)}, second)
    assert first_meta["resumed_from_step"] == 0 and second_meta["resumed_from_step"] == 6  # nothing retrained
    assert (first.out_dir / "model.safetensors").read_bytes() == (
        second.out_dir / "model.safetensors"
    ).read_bytes()
    assert [m["step"] for m in second.metrics] == [m["step"] for m in first.metrics]


def test_load_teacher_from_file_and_s3_uris(
    digits_store: tuple[Storage, Manifest], tiny_teacher: Manifest, tmp_path: Path, s3_root: tuple[str, dict]
) -> None:
    import fsspec

    storage, data = digits_store
    folder = _export(storage, tiny_teacher, tmp_path / "pretrained")
    root, options = s3_root
    for name in ("model.json", "model.safetensors"):
        with fsspec.open(f"{root}/models/edm/{name}", "wb", **options) as handle:
            handle.write((folder / name).read_bytes())
    expected = artifact(storage, tiny_teacher).read_bytes("model.safetensors")
    for uri, opts in ((str(folder), {}), (f"file://{folder}", {}), (f"{root}/models/edm", options)):
        loaded = run_stage(
            storage, "teacher", {"uri": uri, "storage_options": opts, "grid_samples": 4}, {"data": data}
        )
        assert artifact(storage, loaded).read_bytes("model.safetensors") == expected
        assert loaded.meta["loaded"] is True and "raw.safetensors" not in loaded.files


def test_weights_only_pt_state_dict_is_accepted(
    digits_store: tuple[Storage, Manifest], tiny_teacher: Manifest, tmp_path: Path
) -> None:
    storage, data = digits_store
    folder = _export(storage, tiny_teacher, tmp_path / "pt")
    (folder / "model.safetensors").unlink()
    config = artifact(storage, tiny_teacher).read_json("model.json")
    model = load_model(artifact(storage, tiny_teacher).read_bytes("model.safetensors"), config)
    torch.save(model.state_dict(), folder / "model.pt")
    ctx = direct_ctx(storage, tmp_path, "teacher")
    meta = teacher(TeacherParams(uri=str(folder), grid_samples=0), {"data": artifact(storage, data)}, ctx)
    assert meta["params_count"] == sum(p.numel() for p in model.parameters())


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused(
    digits_store: tuple[Storage, Manifest], tiny_teacher: Manifest, tmp_path: Path
) -> None:
    storage, data = digits_store
    folder = _export(storage, tiny_teacher, tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"backbone.conv_in.weight": _RunsCode(str(marker))}, buffer)
    (folder / "model.pt").write_bytes(buffer.getvalue())
    with pytest.raises(InputError, match="model.pt was refused: it is not a weights-only state dict") as err:
        teacher(
            TeacherParams(uri=str(folder)),
            {"data": artifact(storage, data)},
            direct_ctx(storage, tmp_path, "teacher"),
        )
    assert not marker.exists() and "\n" not in str(err.value)


def test_wrong_architecture_and_wrong_kind_are_clean_errors(
    digits_store: tuple[Storage, Manifest], tiny_teacher: Manifest, tmp_path: Path
) -> None:
    import json

    storage, data = digits_store
    folder = _export(storage, tiny_teacher, tmp_path / "wrong")
    config = json.loads((folder / "model.json").read_text())
    config["unet"]["model_channels"] = 16
    (folder / "model.json").write_text(json.dumps(config))
    ctx = direct_ctx(storage, tmp_path, "teacher")
    with pytest.raises(InputError, match="does not fit the architecture in model.json"):
        teacher(TeacherParams(uri=str(folder)), {"data": artifact(storage, data)}, ctx)
    config["kind"] = "cm"
    (folder / "model.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="describes a 'cm' model; this stage needs kind 'edm'"):
        teacher(TeacherParams(uri=str(folder)), {"data": artifact(storage, data)}, ctx)
    with pytest.raises(InputError, match="holds neither model.safetensors nor model.pt"):
        teacher(TeacherParams(uri=str(tmp_path)), {"data": artifact(storage, data)}, ctx)


def test_teacher_sample_is_independent_of_the_number_of_tasks(
    ray_session: None, digits_store: tuple[Storage, Manifest], tiny_teacher: Manifest, tmp_path: Path
) -> None:
    storage, data = digits_store
    outputs = []
    for num_tasks in (1, 2, 3):
        params = TeacherSampleParams(
            num_samples=40, num_steps=4, batch_size=8, seed_start=7, num_tasks=num_tasks
        )
        ctx = direct_ctx(storage, tmp_path, "teacher_sample")
        meta = teacher_sample(
            params, {"teacher": artifact(storage, tiny_teacher), "data": artifact(storage, data)}, ctx
        )
        images, labels, info = read_dataset(lambda name, d=ctx.out_dir: (d / name).read_bytes())
        outputs.append(images)
        assert images.shape == (40, 1, 8, 8) and labels is None and meta["nfe"] == 7
        assert info["source"] == "teacher_sample" and meta["digest"] == info["digest"]
    assert np.array_equal(outputs[0], outputs[1]) and np.array_equal(outputs[0], outputs[2])
    assert outputs[0].std() > 0
