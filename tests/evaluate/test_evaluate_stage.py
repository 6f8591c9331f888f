"""The evaluate stage, called as a bare function on tiny untrained models and real digits."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cmflow.errors import InputError
from cmflow.stage import Artifact, StageContext
from cmflow.stages.evaluate.stage import EvaluateParams, evaluate
from cmflow.stages.table import STAGES
from cmflow.storage import Storage

META_KEYS = {
    "fid_1step",
    "fid_2step",
    "fid_teacher",
    "ratio_1step",
    "ratio_2step",
    "ratio_1step_inf",
    "ratio_2step_inf",
    "nfe_teacher",
    "midpoint_sigma",
    "kid_1step",
    "precision_1step",
    "recall_1step",
    "ref_stats_digest",
    "num_samples",
    "num_seeds",
    "extractor",
}
SMALL = {
    "num_samples": 48,
    "seeds": [0, 1],
    "teacher_steps": 2,
    "midpoint": 0.8,
    "kid_subsets": 4,
    "grid_size": 4,
}


def run(
    params: dict[str, Any], inputs: dict[str, Artifact], ctx: StageContext
) -> tuple[dict[str, Any], dict]:
    meta = evaluate(EvaluateParams(**params), inputs, ctx)
    json.dumps(meta, allow_nan=False)  # the meta must be plain JSON (it is part of the content digest)
    return meta, json.loads((ctx.out_dir / "report.json").read_text())


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as picture:
        picture.load()
        return picture.size


def test_registered_in_the_stage_table() -> None:
    definition = STAGES["evaluate"]
    assert definition.inputs == ("data", "model")
    assert set(definition.optional_inputs) == {"teacher", "teacher_samples"}
    assert "batch_size" in definition.cache_ignore


def test_report_pngs_and_batch_size_independence(
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_model: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
) -> None:
    data = make_dataset(*digits_images)
    inputs = {"data": data, "model": make_model("cm"), "teacher": make_model("edm")}
    ctx = make_ctx()
    meta, report = run({**SMALL, "batch_size": 48}, inputs, ctx)

    assert set(meta) == META_KEYS
    assert meta["nfe_teacher"] == 3 and meta["midpoint_sigma"] == 0.8 and meta["num_samples"] == 48
    for key in ("fid_1step", "fid_2step", "fid_teacher"):
        assert math.isfinite(meta[key]) and meta[key] > 0
    assert meta["ratio_1step"] == pytest.approx(meta["fid_1step"] / meta["fid_teacher"])
    assert meta["ref_stats_digest"] == report["reference"]["stats_digest"]

    assert set(report["settings"]) == {"teacher", "cm-1step", "cm-2step"}
    assert report["settings"]["cm-2step"]["sigmas"] == [80.0, 0.8]
    assert [report["settings"][s]["nfe"] for s in ("teacher", "cm-1step", "cm-2step")] == [3, 1, 2]
    for setting in report["settings"].values():
        assert [row["seed"] for row in setting["per_seed"]] == [0, 1]
        for row in setting["per_seed"]:
            assert row["num_samples"] == 48 and row["pr_samples"] == 48
            assert set(row) >= {"fid", "fid_inf", "kid", "kid_std", "precision", "recall"}
            assert row["fid_inf"] is None  # 48 samples: too few sub-blocks of >= 2 x 64 rows to extrapolate
            assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        fid = setting["summary"]["fid"]
        assert fid["min"] <= fid["median"] <= fid["max"] and fid["std"] >= 0
        assert set(setting["summary"]) == {"fid", "fid_inf", "kid", "precision", "recall"}
    ref = report["reference"]
    assert ref["num_images"] == 1797 and ref["features_kept"] == 1797 and ref["cache_hit"] is False
    assert ref["dataset_digest"] == data.meta["digest"] and ref["key"].startswith("fid-ref-digits-8x8-")
    assert report["extractor"]["name"] == "digits" and len(report["extractor"]["weights_sha256"]) == 64
    assert report["num_samples"] == 48 and report["seeds"] == [0, 1]
    assert report["midpoint"] == {"sigma": 0.8, "source": "params"}
    assert report["ratios"]["2step"] == pytest.approx(meta["ratio_2step"])
    assert "timing_s" not in report  # timings go to the run record and MLflow, never into the artifact
    assert set(ctx.timings) == {"load_s", "reference_s", "midpoint_s", "sampling_s"}

    names = sorted(p.name for p in ctx.out_dir.iterdir())
    assert names == [
        "fid_vs_nfe.png",
        "grid-cm-1step.png",
        "grid-cm-2step.png",
        "grid-teacher.png",
        "report.json",
    ]
    # 4x4 tiles of 8 px upscaled x4, 2 px gaps between them
    assert png_size(ctx.out_dir / "grid-cm-1step.png") == (4 * 32 + 3 * 2, 4 * 32 + 3 * 2)
    assert min(png_size(ctx.out_dir / "fid_vs_nfe.png")) > 100
    messages = [u.get("message", "") for u in ctx.updates]  # type: ignore[attr-defined]
    assert any(m.startswith("reference statistics") for m in messages)
    assert any("teacher seed 1" in m for m in messages) and any("cm-2step seed 0" in m for m in messages)
    last = [u for u in ctx.updates if "total" in u][-1]  # type: ignore[attr-defined]
    assert last["done"] == last["total"]

    # same seeds, other batch sizes: identical samples, so identical numbers; the reference is a cache hit
    ctx2 = make_ctx()
    meta2, report2 = run(
        {**SMALL, "batch_size": 20, "feature_batch_size": 7, "reuse_teacher": False}, inputs, ctx2
    )
    assert report2["reference"]["cache_hit"] is True
    for name in ("grid-teacher.png", "grid-cm-1step.png", "grid-cm-2step.png"):
        assert (ctx2.out_dir / name).read_bytes() == (ctx.out_dir / name).read_bytes()
    # float32 features in other batch groupings round differently in the last bits, nothing more
    for name in ("teacher", "cm-1step", "cm-2step"):
        for row2, row in zip(
            report2["settings"][name]["per_seed"], report["settings"][name]["per_seed"], strict=True
        ):
            assert row2.pop("fid_inf") is row.pop("fid_inf") is None
            assert row2 == pytest.approx(row, rel=1e-6)
    numbers = [k for k in META_KEYS if isinstance(meta[k], float)]
    assert {k: meta2[k] for k in numbers} == pytest.approx({k: meta[k] for k in numbers}, rel=1e-6)
    assert meta2["ref_stats_digest"] == meta["ref_stats_digest"]


def test_teacher_results_are_reused_from_the_store(
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_model: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
) -> None:
    data, teacher = make_dataset(*digits_images), make_model("edm")
    params = {**SMALL, "seeds": [0], "teacher_seeds": [0, 1]}
    _, first = run(params, {"data": data, "model": make_model("cm"), "teacher": teacher}, make_ctx())
    assert first["settings"]["teacher"]["cached_seeds"] == []
    ctx = make_ctx()  # a new student, the same teacher: only the new teacher seed is sampled
    _, second = run(
        {**params, "teacher_seeds": [1, 2]},
        {"data": data, "model": make_model("cm", seed=1), "teacher": teacher},
        ctx,
    )
    assert second["settings"]["teacher"]["cached_seeds"] == [1]
    assert second["settings"]["teacher"]["per_seed"][0] == first["settings"]["teacher"]["per_seed"][1]
    assert any("teacher seed 1 (cached)" in u.get("message", "") for u in ctx.updates)  # type: ignore[attr-defined]
    _, third = run(
        params, {"data": data, "model": make_model("cm"), "teacher": make_model("edm", seed=2)}, make_ctx()
    )
    assert third["settings"]["teacher"]["cached_seeds"] == []


def test_samples_do_not_depend_on_the_batch_split(make_model: Callable[..., Artifact]) -> None:
    import torch

    from cmflow.diffusion.generate import sample_images
    from cmflow.models.io import load_model

    artifact = make_model("edm")
    model = load_model(artifact.path("model.safetensors"), artifact.read_json("model.json"))
    for method in ("edm", "cm"):
        kwargs = {"shape": (1, 8, 8), "method": method, "num_steps": 2, "sigmas": (80.0, 0.5)}
        whole = sample_images(model, range(10, 40), **kwargs)[0]
        parts = torch.cat([sample_images(model, range(a, b), **kwargs)[0] for a, b in ((10, 17), (17, 40))])
        assert whole.dtype == torch.uint8 and torch.equal(whole, parts)


@pytest.mark.parametrize("num_tasks", [2, 3, 7])
def test_a_fanned_out_evaluation_equals_the_one_task_one(
    num_tasks: int,
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_model: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
) -> None:
    """Every seed's images are split over the tasks and their float64 feature sums merged: the same FID
    (<= 1e-9 relative), and the same rank-based metrics, as one task computing everything."""
    data = make_dataset(*digits_images)
    inputs = {"data": data, "model": make_model("cm"), "teacher": make_model("edm")}
    # 240 samples of 64-d features: a well-conditioned covariance (FID is ill-conditioned below ~D samples)
    params = {**SMALL, "num_samples": 240, "batch_size": 40, "reuse_teacher": False}
    one, one_report = run(params, inputs, make_ctx())
    many, many_report = run({**params, "num_tasks": num_tasks}, inputs, make_ctx())
    assert many["fid_1step"] == pytest.approx(one["fid_1step"], rel=1e-9)
    for name in ("teacher", "cm-1step", "cm-2step"):
        for a, b in zip(
            many_report["settings"][name]["per_seed"], one_report["settings"][name]["per_seed"], strict=True
        ):
            assert a["fid"] == pytest.approx(b["fid"], rel=1e-9, abs=0)
            assert (a["kid"], a["precision"], a["recall"]) == (b["kid"], b["precision"], b["recall"])


def test_midpoint_from_model_json_or_search_and_no_teacher(
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_model: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
) -> None:
    data = make_dataset(*digits_images)
    stored = make_model("cm", sampling={"two_step_sigmas": [80.0, 1.25]})
    params = {**SMALL, "seeds": [3], "midpoint": "model"}
    meta, report = run(params, {"data": data, "model": stored}, make_ctx())
    assert meta["midpoint_sigma"] == 1.25 and report["midpoint"]["source"] == "model.json"
    assert meta["fid_teacher"] is None and meta["ratio_1step"] is None and meta["nfe_teacher"] is None
    assert set(report["settings"]) == {"cm-1step", "cm-2step"}

    ctx = make_ctx()
    meta, report = run(
        {**params, "midpoint": "model", "search_iters": 2, "search_samples": 24, "search_range": [0.1, 10.0]},
        {"data": data, "model": make_model("cm")},
        ctx,
    )
    search = report["midpoint"]
    assert search["source"] == "search" and len(search["evaluations"]) == 4
    assert search["sample_seeds_start"] >= 10**9  # held-out seeds, never the evaluation samples
    best = min(search["evaluations"], key=lambda e: e[1])
    assert meta["midpoint_sigma"] == pytest.approx(best[0]) and 0.1 <= best[0] <= 10.0
    assert not (ctx.out_dir / "grid-teacher.png").exists()


def test_fid_of_held_out_real_images_is_far_below_noise(
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_model: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
    storage: Storage,
    tmp_path: Path,
) -> None:
    from cmflow.data.shards import dataset_meta, write_dataset

    images, labels = digits_images
    order = np.random.default_rng(0).permutation(len(images))
    train, held_out = images[order[:1000]], images[order[1000:]]
    noise = np.random.default_rng(1).integers(0, 256, size=held_out.shape, dtype=np.uint8)

    def samples_artifact(name: str, pictures: np.ndarray) -> Artifact:
        folder = tmp_path / name
        folder.mkdir()
        info = write_dataset(folder, pictures, None, source="test", num_classes=0, extra={"num_steps": 18})
        return Artifact(
            storage,
            storage.commit(
                "teacher_sample", hashlib.sha256(name.encode()).hexdigest(), folder, meta=dataset_meta(info)
            ),
        )

    data, model = make_dataset(train), make_model("cm")
    params = {**SMALL, "num_samples": 300, "seeds": [0, 1], "batch_size": 300}
    results = {}
    for name, pictures in (("held-out", held_out), ("noise", noise)):
        meta, report = run(
            params,
            {"data": data, "model": model, "teacher_samples": samples_artifact(name, pictures)},
            make_ctx(),
        )
        teacher = report["settings"]["teacher"]
        assert teacher["source"] == "teacher_samples" and teacher["nfe"] == 35 and teacher["chunks"] == 2
        assert teacher["nfe_assumed"] is False
        results[name] = meta
    real, noisy = results["held-out"], results["noise"]
    assert real["fid_teacher"] * 20 < noisy["fid_teacher"]
    assert (
        real["fid_teacher"] < real["fid_1step"]
    )  # an untrained CM is far from the data, real images are not
    # 780 held-out images: FID_inf (sub-blocks of 780, 390, 195 rows) removes the generated side's 1/N bias
    meta, report = run(
        {**params, "num_samples": 780, "seeds": [0]},
        {"data": data, "model": model, "teacher_samples": samples_artifact("inf", held_out[:780])},
        make_ctx(),
    )
    row = report["settings"]["teacher"]["per_seed"][0]
    assert 0 < row["fid_inf"] < 0.75 * row["fid"]
    assert report["fid_inf"]["teacher"] == row["fid_inf"]
    assert meta["ratio_1step_inf"] == pytest.approx(report["fid_inf"]["cm-1step"] / row["fid_inf"])
    # fewer teacher samples than num_samples: a clean input error
    with pytest.raises(InputError, match="fewer than num_samples"):
        run(
            {**params, "num_samples": 800},
            {"data": data, "model": model, "teacher_samples": samples_artifact("few", held_out[:700])},
            make_ctx(),
        )


def test_bad_inputs_are_input_errors(
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_model: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
) -> None:
    data = make_dataset(*digits_images)
    with pytest.raises(InputError, match="holds a 'edm' model"):
        run(SMALL, {"data": data, "model": make_model("edm")}, make_ctx())
    with pytest.raises(InputError, match="holds a 'cm' model"):
        run(SMALL, {"data": data, "model": make_model("cm"), "teacher": make_model("cm", seed=1)}, make_ctx())
    with pytest.raises(InputError, match="must lie in"):
        run({**SMALL, "midpoint": 95.0}, {"data": data, "model": make_model("cm")}, make_ctx())
    big = make_dataset(np.zeros((4, 1, 16, 16), dtype=np.uint8), name="big")
    with pytest.raises(InputError, match="digits extractor takes grey 8x8"):
        run(SMALL, {"data": big, "model": make_model("cm")}, make_ctx())
    with pytest.raises(ValueError, match="needs weights_uri"):
        EvaluateParams(extractor="inception-v3")
    with pytest.raises(ValueError, match="distinct"):
        EvaluateParams(seeds=[1, 1])
