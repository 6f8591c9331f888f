"""The ``evaluate`` stage: FID, KID and precision/recall of the teacher, CM 1-step and CM 2-step samples.

Every setting is measured on the same latents: seed ``s`` of ``params.seeds`` draws sample ``i`` from the
per-sample seed ``s * num_samples + i`` (:class:`cmflow.diffusion.rng.StackedRandomGenerator`, drawn on the
CPU), so the numbers do not depend on the batch size or the device's RNG. Generated images are quantised to
uint8 exactly as a saved PNG would be ((x + 1) 127.5, rounded, clamped), embedded by the feature extractor,
and compared with the reference statistics of *all* real images of the dataset (cached in the store once per
dataset, extractor weights and resolution: :mod:`cmflow.stages.refstats`). FID over few samples is biased
and moves between seeds by as much as the gaps being measured, so the stage reports the median and the
spread (min, max, std) over ``seeds``. The bias (about k / N for N samples, with k differing between models)
also pulls ratios of FIDs towards 1, so every setting also gets ``fid_inf``, the FID extrapolated to
infinitely many samples from sub-blocks of the same features (:func:`cmflow.metrics.stats.fid_infinity`),
and the report the ratios of those (``ratios_inf``).

Outputs: ``report.json`` (everything), ``fid_vs_nfe.png``, ``grid-teacher.png`` (when a teacher is wired),
``grid-cm-1step.png``, ``grid-cm-2step.png``. The meta holds the flat numbers promotion gates read.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from cmflow.errors import InputError
from cmflow.stage import Artifact, ParamsModel, StageContext, stage

REPORT_FORMAT = 1
#: 2-step midpoint search samples use per-sample seeds from here on, disjoint from the evaluation seeds.
SEARCH_SEED_OFFSET = 2_000_000_000
SETTING_TEACHER, SETTING_1STEP, SETTING_2STEP = "teacher", "cm-1step", "cm-2step"
TEACHER_RESULTS_KIND = "fid_teacher"
METRICS = ("fid", "fid_inf", "kid", "precision", "recall")  # per seed, each summarised over the seeds


class EvaluateParams(ParamsModel):
    extractor: Literal["digits", "inception-v3"] = Field(
        "digits", description="FID feature network: the shipped 8x8 digits net, or the standard Inception-v3."
    )
    weights_uri: str | None = Field(
        None,
        description="Extractor weights (any fsspec URI; required for inception-v3: the standard "
        "pt_inception-2015-12-05-6726825d.pth). Read with the storage options when it shares the root's protocol.",
    )
    num_samples: int = Field(
        10_000, ge=4, le=10_000_000, description="Generated samples per seed and setting."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="Seed s uses sample seeds [s N, (s+1) N).",
    )
    teacher_seeds: list[int] | None = Field(
        None, description="Seeds for the teacher (default: seeds); fewer saves most of the stage's time."
    )
    batch_size: int = Field(1000, ge=1, description="Samples per network call (results do not depend on it).")
    feature_batch_size: int | None = Field(
        None, ge=1, description="Images per extractor call (default 1000 for digits, 100 for inception-v3)."
    )
    teacher_steps: int = Field(18, ge=1, le=1000, description="Heun steps of the teacher (NFE 2 N - 1).")
    teacher_dtype: Literal["float32", "float64"] = Field(
        "float64", description="Teacher ODE arithmetic (float64 as in EDM and every other sampling path)."
    )
    midpoint: float | Literal["search", "model"] = Field(
        "model",
        description="2-step midpoint tau: a number, 'model' (model.json sampling.two_step_sigmas, else search) "
        "or 'search' (ternary search on FID over held-out seeds).",
    )
    search_samples: int = Field(2000, ge=4, description="Samples per FID score during the midpoint search.")
    search_iters: int = Field(8, ge=1, le=30, description="Ternary-search iterations (2 scores each).")
    search_range: tuple[float, float] = Field(
        (0.05, 20.0), description="Search interval for tau (log scale)."
    )
    kid_subsets: int = Field(10, ge=1, le=1000, description="KID subsets (cost grows linearly).")
    kid_subset_size: int = Field(
        1000, ge=2, description="Rows per KID subset (capped by both sample counts)."
    )
    pr_k: int = Field(3, ge=1, le=100, description="k of the k-NN manifolds for precision/recall.")
    pr_max_samples: int = Field(
        10_000, ge=4, description="Rows per side for precision/recall: min(real, generated, this)."
    )
    grid_size: int = Field(8, ge=1, le=64, description="Sample grids hold grid_size x grid_size images.")
    reuse_teacher: bool = Field(
        True,
        description="Keep the sampled teacher's per-seed results in the store and reuse them (same teacher, "
        "seeds, sampler, extractor, reference and metric settings): one teacher is sampled once.",
    )

    @model_validator(mode="after")
    def _check(self) -> EvaluateParams:
        if self.extractor == "inception-v3" and not self.weights_uri:
            raise ValueError(
                "extractor inception-v3 needs weights_uri (the standard FID weights file in your store); "
                "nothing is downloaded"
            )
        for name, seeds in (("seeds", self.seeds), ("teacher_seeds", self.teacher_seeds or [])):
            if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
                raise ValueError(f"{name} must be distinct non-negative integers, got {seeds}")
        lo, hi = self.search_range
        if not 0 < lo < hi:
            raise ValueError(f"search_range must satisfy 0 < lo < hi, got {self.search_range}")
        if isinstance(self.midpoint, float) and not self.midpoint > 0:
            raise ValueError(f"midpoint must be > 0, got {self.midpoint}")
        return self


@dataclass
class _Progress:
    """Cost-weighted progress of one phase, forwarded to ``ctx.progress``."""

    ctx: StageContext
    total: float
    phase: str
    done: float = 0.0

    def add(self, amount: float, message: str) -> None:
        self.done += amount
        self.ctx.progress(round(self.done), round(self.total), message=f"{self.phase}: {message}")


# -- inputs ----------------------------------------------------------------------------------------------------


def _read_images(artifact: Artifact, what: str) -> tuple[Any, dict[str, Any]]:
    """uint8 (N, C, H, W) images and dataset.json of a dataset-format artifact (prepare_data, teacher_sample)."""
    import io

    import numpy as np

    from cmflow.data.images import check_images
    from cmflow.data.shards import DATASET_JSON, read_dataset

    if DATASET_JSON in artifact.files:
        images, _, info = read_dataset(artifact.read_bytes)
        return images, info
    names = (
        ["images.npy"]
        if "images.npy" in artifact.files
        else [f for f in artifact.files if f.startswith("images-")]
    )
    if not names:
        raise InputError(f"input {what!r} has no images.npy; wire a prepare_data or teacher_sample output")
    try:
        arrays = [np.load(io.BytesIO(artifact.read_bytes(n)), allow_pickle=False) for n in sorted(names)]
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"input {what!r}: images are not a readable .npy array ({exc})") from None
    return check_images(np.concatenate(arrays), f"input {what!r}"), {}


def _dataset_info(data: Artifact) -> tuple[str, int, int]:
    """(content digest, channels, resolution) of the dataset artifact, from its meta or dataset.json."""
    meta = data.meta
    if all(k in meta for k in ("digest", "channels", "resolution")):
        return str(meta["digest"]), int(meta["channels"]), int(meta["resolution"])
    info = data.read_json("dataset.json") if "dataset.json" in data.files else {}
    if all(k in info for k in ("digest", "channels", "resolution")):
        return str(info["digest"]), int(info["channels"]), int(info["resolution"])
    raise InputError(
        "input 'data' has no dataset digest in its meta or dataset.json; wire a prepare_data output"
    )


def _load_net(artifact: Artifact, what: str, kind: str, device: str) -> tuple[Any, dict[str, Any]]:
    from cmflow.models.io import load_model

    for name in ("model.safetensors", "model.json"):
        if name not in artifact.files:
            raise InputError(f"input {what!r} has no {name}; wire the output of a model stage")
    config = artifact.read_json("model.json")
    if config.get("kind") != kind:
        expected = "a distill / train_cm output (kind cm)" if kind == "cm" else "a teacher output (kind edm)"
        raise InputError(f"input {what!r} holds a {config.get('kind')!r} model; wire {expected}")
    try:
        model = load_model(artifact.path("model.safetensors"), config)
    except ValueError as exc:
        raise InputError(f"input {what!r}: {exc}") from None
    return model.to(device).eval().requires_grad_(False), config


def _load_extractor(params: EvaluateParams, ctx: StageContext) -> Any:
    """The feature extractor on ``ctx.device``; weights from ``params.weights_uri`` (or the shipped digits net)."""
    import pickle

    from cmflow.metrics.extractors import load_extractor
    from cmflow.storage import open_uri

    weights = None
    if params.weights_uri:
        protocol = params.weights_uri.split("://", 1)[0] if "://" in params.weights_uri else "file"
        weights = open_uri(
            params.weights_uri, ctx.storage.options if protocol == ctx.storage.protocol else {}
        )
    try:
        return load_extractor(params.extractor, weights, device=ctx.device)
    except (ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InputError(
            f"cannot load the {params.extractor} extractor weights from {_redacted(params.weights_uri)}: {first}; "
            "pass the matching weights file"
        ) from None


# -- sampling --------------------------------------------------------------------------------------------------


def _sampler(
    model: Any,
    *,
    method: str,
    shape: tuple[int, int, int],
    num_classes: int,
    num_steps: int = 18,
    sigmas: tuple[float, ...] = (80.0,),
    dtype: str = "float64",
) -> Callable[[range], Any]:
    """``seeds -> uint8 (B, C, H, W)`` CPU tensor for one sampling setting (:mod:`cmflow.diffusion.generate`)."""
    import torch

    from cmflow.diffusion.generate import sample_images

    torch_dtype = torch.float64 if dtype == "float64" else torch.float32

    def sample(seeds: range) -> Any:
        images, _ = sample_images(
            model,
            seeds,
            shape=shape,
            method=method,  # type: ignore[arg-type]
            num_steps=num_steps,
            sigmas=sigmas,
            num_classes=num_classes,
            dtype=torch_dtype,
        )
        return images

    return sample


@dataclass
class _Setting:
    """One row of the evaluation: how to get its images for a seed, and its cost per image (for progress)."""

    name: str
    nfe: int
    seeds: list[int]
    images_for: Callable[[int], Iterator[Any]]  # seed -> batches of uint8 images
    cost: float
    info: dict[str, Any]
    cache: Any = None  # a _SeedCache of per-seed results, or None


def _generated(
    sampler: Callable[[range], Any], num_samples: int, batch_size: int
) -> Callable[[int], Iterator[Any]]:
    def images_for(seed: int) -> Iterator[Any]:
        from cmflow.diffusion.generate import batch_ranges

        for seeds in batch_ranges(seed * num_samples, num_samples, batch_size):
            yield sampler(seeds)

    return images_for


def _teacher_samples_setting(
    artifact: Artifact, params: EvaluateParams, shape: tuple[int, int, int], teacher_seeds: list[int]
) -> _Setting:
    """Reuse a teacher_sample artifact: consecutive chunks of num_samples images stand in for the seeds."""
    images, info = _read_images(artifact, "teacher_samples")
    if tuple(images.shape[1:]) != shape:
        raise InputError(
            f"input 'teacher_samples' holds {tuple(images.shape[1:])} images but the dataset is {shape}; sample "
            "the teacher trained on this dataset"
        )
    n = params.num_samples
    chunks = min(len(teacher_seeds), images.shape[0] // n)
    if chunks < 1:
        raise InputError(
            f"input 'teacher_samples' holds {images.shape[0]} images, fewer than num_samples={n}; sample at least "
            f"{n * len(teacher_seeds)} with teacher_sample or lower num_samples"
        )
    steps = int(info.get("num_steps", params.teacher_steps))

    def images_for(chunk: int) -> Iterator[Any]:
        block = images[chunk * n : (chunk + 1) * n]
        for start in range(0, n, params.batch_size):
            yield block[start : start + params.batch_size]

    return _Setting(
        SETTING_TEACHER,
        2 * steps - 1,
        list(range(chunks)),
        images_for,
        cost=1.0,
        info={
            "source": "teacher_samples",
            "artifact_digest": artifact.digest,
            "num_steps": steps,
            "nfe_assumed": "num_steps" not in info,
            "chunks": chunks,
            "num_images_available": int(images.shape[0]),
        },
    )


# -- measuring -------------------------------------------------------------------------------------------------


def _measure(
    setting: _Setting,
    seed: int,
    extractor: Any,
    reference: Any,
    params: EvaluateParams,
    feature_batch: int,
    progress: _Progress,
) -> tuple[dict[str, Any], Any]:
    """FID / KID / precision / recall of one setting at one seed, and its first grid_size^2 images."""
    import numpy as np

    from cmflow.metrics.extractors import compute_stats
    from cmflow.metrics.stats import fid_from_stats, fid_infinity, kid, precision_recall

    want = params.grid_size**2
    grid: list[Any] = []

    def batches() -> Iterator[Any]:
        for images in setting.images_for(seed):
            if len(grid) < want:
                grid.extend(np.asarray(images)[: want - len(grid)])
            progress.add(setting.cost * len(images), f"{setting.name} seed {seed}")
            yield images

    stats = compute_stats(extractor, batches(), batch_size=feature_batch, keep_features=True)
    mu, sigma = stats.to_moments()
    fake = stats.features
    real = reference.features  # a fixed random subset of the real images (see cmflow.stages.refstats)
    kid_mean, kid_std = kid(fake, real, num_subsets=params.kid_subsets, subset_size=params.kid_subset_size)
    # k-NN radii depend on the sample size, so both manifolds get the same number of points
    m = min(real.shape[0], fake.shape[0], params.pr_max_samples)
    precision, recall = (
        precision_recall(real[:m], fake[:m], k=params.pr_k) if m > params.pr_k else (None, None)
    )
    extrapolated = fid_infinity(fake, reference.stats.mu, reference.stats.sigma)
    row = {
        "seed": seed,
        "num_samples": int(stats.n),
        "fid": fid_from_stats(mu, sigma, reference.stats.mu, reference.stats.sigma),
        "fid_inf": extrapolated[0] if extrapolated else None,
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "pr_samples": int(m),
    }
    return row, np.stack(grid)


@dataclass
class _SeedCache:
    """Per-seed results of one sampled teacher, kept in the store as write-once ``fid_teacher`` artifacts.

    The teacher is by far the most expensive setting (NFE 35) and does not change when only the student
    does, so its per-seed numbers are keyed by everything they depend on -- the teacher's digest, the seed,
    sample count, sampler, extractor weights, reference digest, metric settings and the stage's code
    fingerprint -- and reused by any later evaluation of the same teacher.
    """

    storage: Any
    components: dict[str, Any]
    producer: dict[str, Any]

    def key(self, seed: int) -> str:
        from cmflow.storage import canonical_json, sha256_bytes

        return sha256_bytes(canonical_json({**self.components, "seed": seed}).encode())

    def get(self, seed: int) -> tuple[dict[str, Any], Any] | None:
        import io

        import numpy as np

        from cmflow.cache import lookup

        found = lookup(self.storage, TEACHER_RESULTS_KIND, self.key(seed))
        if not found.hit:
            return None
        row = json.loads(self.storage.read_artifact_file(found.manifest, "measure.json"))
        grid = np.load(
            io.BytesIO(self.storage.read_artifact_file(found.manifest, "grid.npy")), allow_pickle=False
        )
        return row, grid

    def put(self, seed: int, row: dict[str, Any], grid: Any) -> None:
        import tempfile
        from pathlib import Path

        import numpy as np

        with tempfile.TemporaryDirectory(prefix="cmflow-fid-teacher-") as tmp:
            folder = Path(tmp)
            (folder / "measure.json").write_text(json.dumps(row, sort_keys=True, allow_nan=False))
            np.save(folder / "grid.npy", grid, allow_pickle=False)
            self.storage.commit(
                TEACHER_RESULTS_KIND,
                self.key(seed),
                folder,
                meta={"seed": seed, "fid": row["fid"]},
                key_components={**self.components, "seed": seed},
                producer=self.producer,
            )


def _spread(values: list[float | None]) -> dict[str, float | None]:
    """median / mean / std (ddof 1; 0 for one seed) / min / max of the finite values."""
    import numpy as np

    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"median": None, "mean": None, "std": None, "min": None, "max": None}
    return {
        "median": float(np.median(finite)),
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "min": float(finite.min()),
        "max": float(finite.max()),
    }


def _run_setting(
    setting: _Setting,
    extractor: Any,
    reference: Any,
    params: EvaluateParams,
    feature_batch: int,
    progress: _Progress,
) -> tuple[dict[str, Any], Any]:
    """All seeds of one setting (from its cache where it has them): the report entry and the first seed's grid."""
    cache: _SeedCache | None = setting.cache
    per_seed, grids, cached = [], [], []
    for seed in setting.seeds:
        found = cache.get(seed) if cache is not None else None
        if found is not None:
            progress.add(setting.cost * params.num_samples, f"{setting.name} seed {seed} (cached)")
            cached.append(seed)
        else:
            found = _measure(setting, seed, extractor, reference, params, feature_batch, progress)
            if cache is not None:
                cache.put(seed, *found)
        per_seed.append(found[0])
        grids.append(found[1])
    summary = {m: _spread([row.get(m) for row in per_seed]) for m in METRICS}
    entry = {
        "nfe": setting.nfe,
        **setting.info,
        "seeds": setting.seeds,
        "per_seed": per_seed,
        "summary": summary,
    }
    if cache is not None:
        entry["cached_seeds"] = cached
    return entry, grids[0]


# -- the 2-step midpoint ---------------------------------------------------------------------------------------


def _midpoint(
    params: EvaluateParams,
    config: dict[str, Any],
    model: Any,
    make_sampler: Callable[[tuple[float, ...]], Any],
    extractor: Any,
    reference: Any,
    feature_batch: int,
    ctx: StageContext,
) -> tuple[float, dict[str, Any]]:
    """tau for 2-step sampling and how it was chosen (params, model.json, or a ternary search on FID)."""
    from cmflow.diffusion.generate import batch_ranges
    from cmflow.diffusion.samplers import ternary_search_midpoint
    from cmflow.metrics.extractors import compute_stats
    from cmflow.metrics.stats import fid_from_stats

    sigma_max, sigma_min = float(model.sigma_max), float(model.sigma_min)
    if isinstance(params.midpoint, float):
        tau, info = float(params.midpoint), {"source": "params"}
    else:
        stored = (config.get("sampling") or {}).get("two_step_sigmas") if params.midpoint == "model" else None
        if stored:
            if len(stored) != 2:
                raise InputError(f"model.json sampling.two_step_sigmas must be [T, tau], got {stored}")
            tau, info = float(stored[1]), {"source": "model.json"}
        else:
            lo, hi = max(params.search_range[0], sigma_min), min(params.search_range[1], sigma_max * 0.999)
            start = SEARCH_SEED_OFFSET
            progress = _Progress(ctx, 2 * params.search_iters * params.search_samples, "midpoint search")
            evaluations: list[list[float]] = []

            def score(tau: float) -> float:
                sampler = make_sampler((sigma_max, tau))
                batches = (sampler(s) for s in batch_ranges(start, params.search_samples, params.batch_size))
                stats = compute_stats(extractor, batches, batch_size=feature_batch)
                fid = fid_from_stats(*stats.to_moments(), reference.stats.mu, reference.stats.sigma)
                evaluations.append([tau, fid])
                progress.add(params.search_samples, f"tau={tau:.4g} FID={fid:.3f}")
                return fid

            tau, best = ternary_search_midpoint(score, lo, hi, num_iters=params.search_iters)
            info = {
                "source": "search",
                "search_fid": best,
                "range": [lo, hi],
                "iters": params.search_iters,
                "samples": params.search_samples,
                "sample_seeds_start": start,
                "evaluations": evaluations,
            }
    if not sigma_min <= tau < sigma_max:
        raise InputError(
            f"2-step midpoint tau={tau} must lie in [{sigma_min}, {sigma_max}); fix params.midpoint"
        )
    return tau, info


# -- the stage -------------------------------------------------------------------------------------------------


def _teacher_setting(
    inputs: dict[str, Artifact],
    params: EvaluateParams,
    ctx: StageContext,
    shape: tuple[int, int, int],
    extractor: Any,
    reference: Any,
) -> _Setting | None:
    """The teacher row: reused ``teacher_samples`` if wired, else the ``teacher`` sampled at NFE 2 N - 1."""
    teacher_seeds = list(params.teacher_seeds or params.seeds)
    if "teacher_samples" in inputs:
        return _teacher_samples_setting(inputs["teacher_samples"], params, shape, teacher_seeds)
    if "teacher" not in inputs:
        return None
    artifact = inputs["teacher"]
    teacher, config = _load_net(artifact, "teacher", "edm", ctx.device)
    sampler = _sampler(
        teacher,
        method="edm",
        shape=shape,
        num_classes=int(config.get("num_classes", 0) or 0),
        num_steps=params.teacher_steps,
        dtype=params.teacher_dtype,
    )
    cache = None
    if params.reuse_teacher:
        components = {
            "format": REPORT_FORMAT,
            "code": evaluate.stage_def.code_fingerprint(),  # type: ignore[attr-defined]
            "teacher": artifact.digest,
            "num_samples": params.num_samples,
            "num_steps": params.teacher_steps,
            "dtype": params.teacher_dtype,
            "shape": list(shape),
            "extractor": extractor.name,
            "extractor_sha256": extractor.weights_sha256,
            "reference": reference.digest,
            "kid": [params.kid_subsets, params.kid_subset_size],
            "pr": [params.pr_k, params.pr_max_samples],
            "grid_size": params.grid_size,
        }
        cache = _SeedCache(ctx.storage, components, {"run_id": ctx.run_id, "stage": ctx.stage})
    nfe = 2 * params.teacher_steps - 1
    info = {
        "source": "sampled",
        "sampler": "edm-heun",
        "num_steps": params.teacher_steps,
        "dtype": params.teacher_dtype,
        "artifact_digest": artifact.digest,
    }
    return _Setting(
        SETTING_TEACHER,
        nfe,
        teacher_seeds,
        _generated(sampler, params.num_samples, params.batch_size),
        cost=nfe + 1.0,
        info=info,
        cache=cache,
    )


def _cm_settings(
    params: EvaluateParams, cm_sampler: Callable[..., Any], sigma_max: float, tau: float
) -> list[_Setting]:
    """CM 1-step (T) and 2-step (T, tau) rows; the cost per image counts the extractor call as one NFE."""
    rows = []
    for name, sigmas in ((SETTING_1STEP, (sigma_max,)), (SETTING_2STEP, (sigma_max, tau))):
        images_for = _generated(cm_sampler(sigmas), params.num_samples, params.batch_size)
        rows.append(
            _Setting(
                name,
                len(sigmas),
                list(params.seeds),
                images_for,
                cost=len(sigmas) + 1.0,
                info={"source": "sampled", "sampler": "cm", "sigmas": list(sigmas)},
            )
        )
    return rows


def _medians(results: dict[str, dict[str, Any]], metric: str = "fid") -> dict[str, float | None]:
    return {name: entry["summary"][metric]["median"] for name, entry in results.items()}


def _ratios(fid: dict[str, float | None]) -> dict[str, float | None]:
    teacher = fid.get(SETTING_TEACHER)
    return {
        key: (fid[name] / teacher if teacher and fid.get(name) is not None else None)  # type: ignore[operator]
        for key, name in (("1step", SETTING_1STEP), ("2step", SETTING_2STEP))
    }


def _plot(results: dict[str, dict[str, Any]], path: Any, title: str) -> None:
    from cmflow.metrics.plot import FidPoint, save_fid_vs_nfe

    labels = {
        SETTING_TEACHER: ("teacher", "teacher (EDM Heun)"),
        SETTING_1STEP: ("1-step", "CM"),
        SETTING_2STEP: ("2-step", "CM"),
    }
    points = []
    for name, entry in results.items():
        fid = entry["summary"]["fid"]
        if fid["median"] is not None:
            points.append(FidPoint(*labels[name], entry["nfe"], fid["median"], fid["min"], fid["max"]))
    save_fid_vs_nfe(points, path, title=title)


@stage(
    "evaluate",
    params=EvaluateParams,
    version="1",
    inputs=("data", "model"),
    optional_inputs=("teacher", "teacher_samples"),
    cache_ignore=("batch_size", "feature_batch_size", "reuse_teacher"),
)
def evaluate(params: EvaluateParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """FID / KID / precision-recall of the CM at 1 and 2 steps and of the teacher, over several seeds.

    Inputs: ``data`` (prepare_data), ``model`` (distill / train_cm), optional ``teacher`` (teacher) and
    ``teacher_samples`` (teacher_sample: reused instead of sampling the teacher; wins over ``teacher``).
    Writes ``report.json``, ``fid_vs_nfe.png`` and one sample grid per setting.

    Examples:
        stages: {evaluate: {kind: evaluate, inputs: {data: data, model: distill, teacher: teacher},
                            params: {num_samples: 10000, seeds: [0, 1, 2]}}}
    """
    import torch

    from cmflow.data.images import save_grid
    from cmflow.stages.refstats import get_reference

    torch.set_num_threads(ctx.num_threads)
    timing: dict[str, float] = {}
    clock = time.perf_counter()
    data = inputs["data"]
    dataset_digest, channels, resolution = _dataset_info(data)
    shape = (channels, resolution, resolution)
    if params.extractor == "digits" and shape != (1, 8, 8):
        raise InputError(
            f"the digits extractor takes grey 8x8 images but the dataset is {channels}x{resolution}x{resolution}; "
            "set params.extractor: inception-v3 with params.weights_uri"
        )
    model, config = _load_net(inputs["model"], "model", "cm", ctx.device)
    image = config.get("image") or {}
    if image and (image.get("channels"), image.get("resolution")) != (channels, resolution):
        raise InputError(
            f"input 'model' makes {image.get('channels')}x{image.get('resolution')} images but the dataset is "
            f"{channels}x{resolution}; evaluate it against the dataset it was trained on"
        )
    extractor = _load_extractor(params, ctx)
    feature_batch = params.feature_batch_size or (1000 if params.extractor == "digits" else 100)
    timing["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ref_progress = _Progress(ctx, 1, "reference statistics")

    def on_ref_batch(done: int, total: int) -> None:
        ref_progress.total, ref_progress.done = total, done
        ref_progress.add(0, f"{done}/{total} real images")

    reference = get_reference(
        ctx.storage,
        lambda: _read_images(data, "data")[0],
        dataset_digest=dataset_digest,
        extractor=extractor,
        resolution=resolution,
        batch_size=feature_batch,
        on_batch=on_ref_batch,
        producer={"run_id": ctx.run_id, "stage": ctx.stage},
    )
    timing["reference"] = time.perf_counter() - clock

    num_classes = int(config.get("num_classes", 0) or 0)

    def cm_sampler(sigmas: tuple[float, ...]) -> Callable[[range], Any]:
        return _sampler(model, method="cm", shape=shape, num_classes=num_classes, sigmas=sigmas)

    clock = time.perf_counter()
    tau, midpoint_info = _midpoint(
        params, config, model, cm_sampler, extractor, reference, feature_batch, ctx
    )
    timing["midpoint"] = time.perf_counter() - clock

    teacher = _teacher_setting(inputs, params, ctx, shape, extractor, reference)
    settings = ([teacher] if teacher else []) + _cm_settings(params, cm_sampler, float(model.sigma_max), tau)
    progress = _Progress(ctx, sum(s.cost * params.num_samples * len(s.seeds) for s in settings), "sampling")
    results: dict[str, dict[str, Any]] = {}
    for setting in settings:
        clock = time.perf_counter()
        results[setting.name], grid = _run_setting(
            setting, extractor, reference, params, feature_batch, progress
        )
        save_grid(grid, ctx.out_dir / f"grid-{setting.name}.png", cols=params.grid_size)
        timing[setting.name] = time.perf_counter() - clock

    fid, fid_inf, kid, precision, recall = (_medians(results, m) for m in METRICS)
    ratios, ratios_inf = _ratios(fid), _ratios(fid_inf)
    _plot(
        results,
        ctx.out_dir / "fid_vs_nfe.png",
        f"FID ({extractor.name}) vs NFE, {params.num_samples} samples",
    )
    report = {
        "format": REPORT_FORMAT,
        "extractor": {
            "name": extractor.name,
            "weights_sha256": extractor.weights_sha256,
            "num_features": int(extractor.num_features),
            "weights_uri": _redacted(params.weights_uri),
        },
        "reference": reference.summary(),
        "dataset": {
            "digest": dataset_digest,
            "channels": channels,
            "resolution": resolution,
            "artifact_digest": data.digest,
        },
        "model": {"artifact_digest": inputs["model"].digest, "num_classes": num_classes},
        "num_samples": params.num_samples,
        "seeds": list(params.seeds),
        "teacher_seeds": teacher.seeds if teacher else [],
        "sample_seeds": f"seed s draws sample i from per-sample seed s * {params.num_samples} + i "
        "(StackedRandomGenerator on the CPU)",
        "midpoint": {"sigma": tau, **midpoint_info},
        "settings": results,
        "fid": fid,
        "ratios": ratios,
        "fid_inf": fid_inf,
        "ratios_inf": ratios_inf,
        "kid": {"subsets": params.kid_subsets, "subset_size": params.kid_subset_size},
        "precision_recall": {"k": params.pr_k, "max_samples": params.pr_max_samples},
    }
    (ctx.out_dir / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False))
    ctx.log_timing(**{f"{name}_s": round(seconds, 3) for name, seconds in timing.items()})
    return {
        "fid_1step": fid[SETTING_1STEP],
        "fid_2step": fid[SETTING_2STEP],
        "fid_teacher": fid.get(SETTING_TEACHER),
        "ratio_1step": ratios["1step"],
        "ratio_2step": ratios["2step"],
        "ratio_1step_inf": ratios_inf["1step"],
        "ratio_2step_inf": ratios_inf["2step"],
        "nfe_teacher": teacher.nfe if teacher else None,
        "midpoint_sigma": tau,
        "kid_1step": kid[SETTING_1STEP],
        "precision_1step": precision[SETTING_1STEP],
        "recall_1step": recall[SETTING_1STEP],
        "ref_stats_digest": reference.digest,
        "num_samples": params.num_samples,
        "num_seeds": len(params.seeds),
        "extractor": extractor.name,
    }


def _redacted(uri: str | None) -> str | None:
    from cmflow.redact import redact_uri

    return redact_uri(uri) if uri else None
