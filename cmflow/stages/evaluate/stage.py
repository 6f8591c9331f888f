"""The ``evaluate`` stage: FID, KID and precision/recall of the teacher, CM 1-step and CM 2-step samples.

Every setting is measured on the same latents: seed ``s`` of ``params.seeds`` draws sample ``i`` from the
per-sample seed ``s * num_samples + i`` (:mod:`cmflow.diffusion.generate`, drawn on the CPU), so the numbers
do not depend on the batch size, the number of tasks or the device. The work is spread over Ray tasks with
the stage's per-task resources, ``num_tasks`` at once (:mod:`cmflow.stages.evaluate.work`): each embeds a
slice of a seed's images and returns float64 feature sums about the reference mean, which add up exactly.
Generated images are quantised to uint8 exactly as a saved PNG would be, embedded by the feature extractor,
and compared with the reference statistics of the real images (cached in the store once per dataset,
extractor weights and resolution: :mod:`cmflow.stages.refstats`). FID over few samples is biased and moves
between seeds by as much as the gaps being measured, so the stage reports the median and the spread (min,
max, std) over ``seeds``. The bias (about k / N for N samples, k differing between models) also pulls ratios
of FIDs towards 1, so every setting also gets ``fid_inf``, the FID extrapolated to infinitely many samples
from sub-blocks of the same features (:func:`cmflow.metrics.stats.fid_infinity`), and the report the ratios
of those (``ratios_inf``).

Outputs: ``report.json`` (everything), ``fid_vs_nfe.png``, ``grid-teacher.png`` (when a teacher is wired),
``grid-cm-1step.png``, ``grid-cm-2step.png``. The meta holds the flat numbers promotion gates read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cmflow.errors import InputError
from cmflow.stage import Artifact, StageContext, stage
from cmflow.stages.evaluate.params import CACHE_IGNORE, EvaluateParams
from cmflow.stages.evaluate.report import METRICS, SETTING_1STEP, SETTING_2STEP, SETTING_TEACHER

REPORT_FORMAT = 2
#: 2-step midpoint search samples use per-sample seeds from here on, disjoint from the evaluation seeds.
SEARCH_SEED_OFFSET = 2_000_000_000

__all__ = ["EvaluateParams", "evaluate"]


@dataclass
class _Progress:
    """Cost-weighted progress of one phase, forwarded to ``ctx.progress``."""

    ctx: StageContext
    total: float
    phase: str
    done: float = 0.0

    def add(self, amount: float, message: str) -> None:
        self.done += amount
        self.ctx.progress(round(self.done), round(max(self.total, 1)), message=f"{self.phase}: {message}")


# -- inputs ----------------------------------------------------------------------------------------------------


def _dataset(artifact: Artifact, what: str) -> Any:
    from cmflow.data.shards import DATASET_JSON, DatasetInfo

    if DATASET_JSON not in artifact.files:
        raise InputError(
            f"input {what!r} has no {DATASET_JSON}; wire a prepare_data or teacher_sample output"
        )
    return DatasetInfo.parse(artifact.read_bytes(DATASET_JSON), f"input {what!r}")


def _net(artifact: Artifact, what: str, kind: str) -> tuple[Any, Any, dict[str, Any]]:
    """(a NetRef for the tasks, the model loaded here to check it, model.json)."""
    import ray

    from cmflow.models.io import load_model
    from cmflow.stages.evaluate.work import NetRef

    for name in ("model.safetensors", "model.json"):
        if name not in artifact.files:
            raise InputError(f"input {what!r} has no {name}; wire the output of a model stage")
    config = artifact.read_json("model.json")
    if config.get("kind") != kind:
        expected = "a distill / train_cm output (kind cm)" if kind == "cm" else "a teacher output (kind edm)"
        raise InputError(f"input {what!r} holds a {config.get('kind')!r} model; wire {expected}")
    weights = artifact.read_bytes("model.safetensors")
    try:
        model = load_model(weights, config)
    except ValueError as exc:
        raise InputError(f"input {what!r}: {exc}") from None
    sha = artifact.manifest.files["model.safetensors"]["sha256"]
    return NetRef(ray.put(weights) if ray.is_initialized() else weights, config, sha), model, config


def _extractor(params: EvaluateParams, ctx: StageContext) -> tuple[Any, Any]:
    """(an ExtractorRef for the tasks, the extractor loaded here: its name, width and weights digest)."""
    import pickle

    import ray

    from cmflow.metrics.extractors import load_extractor
    from cmflow.stages.evaluate.work import ExtractorRef
    from cmflow.storage import open_uri

    weights = None
    if params.weights_uri:
        protocol = params.weights_uri.split("://", 1)[0] if "://" in params.weights_uri else "file"
        weights = open_uri(
            params.weights_uri, ctx.storage.options if protocol == ctx.storage.protocol else {}
        )
    try:
        extractor = load_extractor(params.extractor, weights)
    except (ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InputError(
            f"cannot load the {params.extractor} extractor weights from {_redacted(params.weights_uri)}: {first}; "
            "pass the matching weights file"
        ) from None
    shared = ray.put(weights) if weights is not None and ray.is_initialized() else weights
    return ExtractorRef(params.extractor, shared, extractor.weights_sha256), extractor


# -- running work ----------------------------------------------------------------------------------------------


def _split(start: int, count: int, parts: int, align: int) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous slices of [start, start + count), cut only at ``start + k align``.

    Network and extractor batches are cut at the same absolute positions however the work is split, so every
    image is computed in the same batch -- bit for bit the same -- for any number of tasks.
    """
    import numpy as np

    blocks = -(-count // align)
    edges = np.linspace(0, blocks, min(parts, blocks) + 1).round().astype(int) * align
    cuts = [start + min(int(e), count) for e in edges]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


@dataclass
class _Job:
    """A quantity measured as several pieces: its work items and what to do with the merged piece."""

    works: list[Any]
    finish: Callable[[Any], None]
    cost: float  # for progress: images x NFE-ish
    label: str


def _run(jobs: list[_Job], params: EvaluateParams, ctx: StageContext, progress: _Progress) -> None:
    """Run every job's pieces (``num_tasks`` at a time), finishing each job as soon as its pieces are in."""
    from cmflow.distributed.tasks import iter_tasks
    from cmflow.stages.evaluate.work import measure, merge

    items = [(j, w) for j, job in enumerate(jobs) for w in job.works]
    pieces: list[Any] = []
    results = iter_tasks(
        measure,
        [w for _, w in items],
        ctx.resources,
        name=f"cmflow:{ctx.stage}:measure",
        max_in_flight=params.num_tasks,
    )
    for (j, work), piece in zip(items, results, strict=True):
        pieces.append(piece)
        job = jobs[j]
        progress.add(job.cost * (work.stop - work.start), job.label)
        if len(pieces) == len(job.works):
            job.finish(merge(pieces))
            pieces = []


# -- the reference ---------------------------------------------------------------------------------------------


def _reference(
    params: EvaluateParams, data: Artifact, info: Any, extractor_ref: Any, extractor: Any, ctx: StageContext
) -> Any:
    """The real images' statistics: from the store, or measured over ``num_tasks`` slices and committed."""
    from cmflow.stages.evaluate.work import Work
    from cmflow.stages.refstats import commit_reference, kept_rows, lookup_reference

    count = min(info.num_images, params.reference_images or info.num_images)
    capped = count if params.reference_images else None
    resolution = info.shape[1]
    cached = lookup_reference(ctx.storage, info.digest, extractor, resolution, capped)
    if cached is not None:
        return cached
    keep = kept_rows(count)
    feature_batch = _feature_batch(params)
    works = [
        Work(
            extractor_ref,
            a,
            b,
            rows=data,
            keep=keep[(keep >= a) & (keep < b)] - a,
            batch_size=feature_batch,
            feature_batch=feature_batch,
            gpus=ctx.resources.gpus,
        )
        for a, b in _split(0, count, params.num_tasks, feature_batch)
    ]
    found: dict[str, Any] = {}
    progress = _Progress(ctx, count, "reference statistics")
    _run(
        [_Job(works, lambda piece: found.setdefault("piece", piece), 1.0, "real images")],
        params,
        ctx,
        progress,
    )
    piece = found["piece"]
    return commit_reference(
        ctx.storage,
        piece.stats,
        piece.features,
        dataset_digest=info.digest,
        extractor=extractor,
        resolution=resolution,
        num_images=capped,
        producer={"run_id": ctx.run_id, "stage": ctx.stage},
    )


def _feature_batch(params: EvaluateParams) -> int:
    return params.feature_batch_size or (1000 if params.extractor == "digits" else 100)


# -- settings and their measurements ---------------------------------------------------------------------------


@dataclass
class _Setting:
    """One row of the evaluation: how its images are made, its seeds and its cost per image (progress)."""

    name: str
    nfe: int
    seeds: list[int]
    works: Callable[[int], list[Any]]  # seed -> the work items of that seed
    cost: float
    info: dict[str, Any]
    cache: Any = None  # a SeedCache of per-seed results, or None
    per_seed: dict[int, tuple[dict[str, Any], Any]] = field(default_factory=dict)
    cached: list[int] = field(default_factory=list)


Sampler = Callable[[int, int, int, bool], list[Any]]  # (first seed, count, grid, keep rows) -> work items


def _sampled(
    net: Any,
    sampling: dict[str, Any],
    params: EvaluateParams,
    extractor_ref: Any,
    reference: Any,
    gpus: float,
) -> Sampler:
    """Work items sampling seeds [start, start + count) with ``net``, split over ``num_tasks``."""
    from cmflow.stages.evaluate.work import Work

    feature_batch = _feature_batch(params)

    def works(start: int, count: int, grid: int, keep: bool) -> list[Any]:
        return [
            Work(
                extractor_ref,
                a,
                b,
                net=net,
                sampling=sampling,
                shift=reference.stats.mu,
                keep=keep,
                grid=grid if a == start else 0,
                batch_size=params.batch_size,
                feature_batch=feature_batch,
                gpus=gpus,
            )
            for a, b in _split(start, count, params.num_tasks, params.batch_size)
        ]

    return works


def _per_seed(sampler: Sampler, params: EvaluateParams) -> Callable[[int], list[Any]]:
    """Seed s of a setting: sample seeds [s N, (s + 1) N), the first grid_size^2 images for the grid."""
    n = params.num_samples
    return lambda seed: sampler(seed * n, n, params.grid_size**2, True)


def _metrics(piece: Any, seed: int, reference: Any, params: EvaluateParams) -> dict[str, Any]:
    """FID / FID-infinity / KID / precision / recall of one seed's merged piece."""
    from cmflow.metrics.stats import fid_from_stats, fid_infinity, kid, precision_recall

    mu, sigma = piece.stats.to_moments()
    fake, real = piece.features, reference.features  # real: a fixed random subset (cmflow.stages.refstats)
    kid_mean, kid_std = kid(fake, real, num_subsets=params.kid_subsets, subset_size=params.kid_subset_size)
    # k-NN radii depend on the sample size, so both manifolds get the same number of points
    m = min(real.shape[0], fake.shape[0], params.pr_max_samples)
    precision, recall = (
        precision_recall(real[:m], fake[:m], k=params.pr_k) if m > params.pr_k else (None, None)
    )
    extrapolated = fid_infinity(fake, reference.stats.mu, reference.stats.sigma)
    return {
        "seed": seed,
        "num_samples": int(piece.stats.n),
        "fid": fid_from_stats(mu, sigma, reference.stats.mu, reference.stats.sigma),
        "fid_inf": extrapolated[0] if extrapolated else None,
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "pr_samples": int(m),
    }


def _jobs(setting: _Setting, reference: Any, params: EvaluateParams, ctx: StageContext) -> list[_Job]:
    """The setting's uncached seeds as jobs (cached ones are filled in from the store right away)."""
    jobs = []
    for seed in setting.seeds:
        found = setting.cache.get(seed) if setting.cache is not None else None
        if found is not None:
            setting.per_seed[seed] = found
            setting.cached.append(seed)
            ctx.progress(0, 1, message=f"sampling: {setting.name} seed {seed} (cached)")
            continue

        def finish(piece: Any, seed: int = seed) -> None:
            row = _metrics(piece, seed, reference, params)
            setting.per_seed[seed] = (row, piece.grid)
            if setting.cache is not None:
                setting.cache.put(seed, row, piece.grid)

        jobs.append(_Job(setting.works(seed), finish, setting.cost, f"{setting.name} seed {seed}"))
    return jobs


def _entry(setting: _Setting) -> tuple[dict[str, Any], Any]:
    """The report entry of a measured setting and its first seed's grid."""
    from cmflow.stages.evaluate.report import spread

    per_seed = [setting.per_seed[s][0] for s in setting.seeds]
    entry = {
        "nfe": setting.nfe,
        **setting.info,
        "seeds": setting.seeds,
        "per_seed": per_seed,
        "summary": {m: spread([row.get(m) for row in per_seed]) for m in METRICS},
    }
    if setting.cache is not None:
        entry["cached_seeds"] = setting.cached
    return entry, setting.per_seed[setting.seeds[0]][1]


def _teacher_setting(
    inputs: dict[str, Artifact],
    params: EvaluateParams,
    ctx: StageContext,
    shape: tuple[int, int, int],
    extractor_ref: Any,
    reference: Any,
) -> _Setting | None:
    """The teacher row: reused ``teacher_samples`` if wired, else the ``teacher`` sampled at NFE 2 N - 1."""
    from cmflow.stages.evaluate.teacher_cache import SeedCache
    from cmflow.stages.evaluate.work import Work

    teacher_seeds = list(params.teacher_seeds or params.seeds)
    if "teacher_samples" in inputs:
        artifact = inputs["teacher_samples"]
        info = _dataset(artifact, "teacher_samples")
        if info.shape != shape:
            raise InputError(
                f"input 'teacher_samples' holds {info.shape} images but the dataset is {shape}; sample the "
                "teacher trained on this dataset"
            )
        n = params.num_samples
        chunks = min(len(teacher_seeds), info.num_images // n)
        if chunks < 1:
            raise InputError(
                f"input 'teacher_samples' holds {info.num_images} images, fewer than num_samples={n}; sample at "
                f"least {n * len(teacher_seeds)} with teacher_sample or lower num_samples"
            )
        steps = int(info.raw.get("num_steps", params.teacher_steps))
        feature_batch = _feature_batch(params)

        def reused(chunk: int) -> list[Any]:
            return [
                Work(
                    extractor_ref,
                    a,
                    b,
                    rows=artifact,
                    shift=reference.stats.mu,
                    grid=params.grid_size**2 if a == chunk * n else 0,
                    batch_size=params.batch_size,
                    feature_batch=feature_batch,
                    gpus=ctx.resources.gpus,
                )
                for a, b in _split(chunk * n, n, params.num_tasks, params.batch_size)
            ]

        return _Setting(
            SETTING_TEACHER,
            2 * steps - 1,
            list(range(chunks)),
            reused,
            cost=1.0,
            info={
                "source": "teacher_samples",
                "artifact_digest": artifact.digest,
                "num_steps": steps,
                "nfe_assumed": "num_steps" not in info.raw,
                "chunks": chunks,
                "num_images_available": info.num_images,
            },
        )
    if "teacher" not in inputs:
        return None
    artifact = inputs["teacher"]
    net, _, config = _net(artifact, "teacher", "edm")
    sampling = {
        "method": "edm",
        "num_steps": params.teacher_steps,
        "dtype": params.teacher_dtype,
        "shape": shape,
        "num_classes": int(config.get("num_classes", 0) or 0),
    }
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
            "extractor": extractor_ref.name,
            "extractor_sha256": extractor_ref.sha256,
            "reference": reference.digest,
            "kid": [params.kid_subsets, params.kid_subset_size],
            "pr": [params.pr_k, params.pr_max_samples],
            "grid_size": params.grid_size,
        }
        cache = SeedCache(ctx.storage, components, {"run_id": ctx.run_id, "stage": ctx.stage})
    nfe = 2 * params.teacher_steps - 1
    info = {
        "source": "sampled",
        "sampler": "edm-heun",
        "num_steps": params.teacher_steps,
        "dtype": params.teacher_dtype,
        "artifact_digest": artifact.digest,
    }
    works = _per_seed(_sampled(net, sampling, params, extractor_ref, reference, ctx.resources.gpus), params)
    return _Setting(SETTING_TEACHER, nfe, teacher_seeds, works, cost=nfe + 1.0, info=info, cache=cache)


# -- the 2-step midpoint ---------------------------------------------------------------------------------------


def _midpoint(
    params: EvaluateParams,
    config: dict[str, Any],
    model: Any,
    cm_sampler: Callable[[tuple[float, ...]], Sampler],
    reference: Any,
    ctx: StageContext,
) -> tuple[float, dict[str, Any]]:
    """tau for 2-step sampling and how it was chosen (params, model.json, or a ternary search on FID)."""
    from cmflow.diffusion.samplers import ternary_search_midpoint
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
            progress = _Progress(ctx, 3 * params.search_iters * params.search_samples * 2, "midpoint search")
            evaluations: list[list[float]] = []

            def score(tau: float) -> float:
                found: dict[str, Any] = {}
                works = cm_sampler((sigma_max, tau))(SEARCH_SEED_OFFSET, params.search_samples, 0, False)
                job = _Job(works, lambda piece: found.setdefault("piece", piece), 3.0, f"tau={tau:.4g}")
                _run([job], params, ctx, progress)
                mu, sigma = found["piece"].stats.to_moments()
                fid = fid_from_stats(mu, sigma, reference.stats.mu, reference.stats.sigma)
                evaluations.append([tau, fid])
                return fid

            tau, best = ternary_search_midpoint(score, lo, hi, num_iters=params.search_iters)
            info = {
                "source": "search",
                "search_fid": best,
                "range": [lo, hi],
                "iters": params.search_iters,
                "samples": params.search_samples,
                "sample_seeds_start": SEARCH_SEED_OFFSET,
                "evaluations": evaluations,
            }
    if not sigma_min <= tau < sigma_max:
        raise InputError(
            f"2-step midpoint tau={tau} must lie in [{sigma_min}, {sigma_max}); fix params.midpoint"
        )
    return tau, info


# -- the stage -------------------------------------------------------------------------------------------------


@stage(
    "evaluate",
    params=EvaluateParams,
    version="2",
    inputs=("data", "model"),
    optional_inputs=("teacher", "teacher_samples"),
    cache_ignore=CACHE_IGNORE,
    distributed=True,
)
def evaluate(params: EvaluateParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """FID / KID / precision-recall of the CM at 1 and 2 steps and of the teacher, over several seeds, in Ray
    tasks with the stage's resources (``num_tasks`` at once; the numbers do not depend on it).

    Inputs: ``data`` (prepare_data), ``model`` (distill / train_cm), optional ``teacher`` (teacher) and
    ``teacher_samples`` (teacher_sample: reused instead of sampling the teacher; wins over ``teacher``).
    Writes ``report.json``, ``fid_vs_nfe.png`` and one sample grid per setting.

    Examples:
        stages: {evaluate: {kind: evaluate, inputs: {data: data, model: distill, teacher: teacher},
                            params: {num_samples: 10000, seeds: [0, 1, 2], num_tasks: 2}}}
    """
    from cmflow.data.images import save_grid
    from cmflow.stages.evaluate.report import medians, plot, ratios

    timing: dict[str, float] = {}
    clock = time.perf_counter()
    data = inputs["data"]
    info = _dataset(data, "data")
    shape = info.shape
    channels, resolution = shape[0], shape[1]
    if params.extractor == "digits" and shape != (1, 8, 8):
        raise InputError(
            f"the digits extractor takes grey 8x8 images but the dataset is {channels}x{resolution}x{resolution}; "
            "set params.extractor: inception-v3 with params.weights_uri"
        )
    net, model, config = _net(inputs["model"], "model", "cm")
    image = config.get("image") or {}
    if image and (image.get("channels"), image.get("resolution")) != (channels, resolution):
        raise InputError(
            f"input 'model' makes {image.get('channels')}x{image.get('resolution')} images but the dataset is "
            f"{channels}x{resolution}; evaluate it against the dataset it was trained on"
        )
    extractor_ref, extractor = _extractor(params, ctx)
    timing["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    reference = _reference(params, data, info, extractor_ref, extractor, ctx)
    timing["reference"] = time.perf_counter() - clock

    num_classes = int(config.get("num_classes", 0) or 0)

    def cm_sampler(sigmas: tuple[float, ...]) -> Sampler:
        sampling = {"method": "cm", "sigmas": list(sigmas), "shape": shape, "num_classes": num_classes}
        return _sampled(net, sampling, params, extractor_ref, reference, ctx.resources.gpus)

    clock = time.perf_counter()
    tau, midpoint_info = _midpoint(params, config, model, cm_sampler, reference, ctx)
    timing["midpoint"] = time.perf_counter() - clock

    teacher = _teacher_setting(inputs, params, ctx, shape, extractor_ref, reference)
    settings = ([teacher] if teacher else []) + [
        _Setting(
            name,
            len(sigmas),
            list(params.seeds),
            _per_seed(cm_sampler(sigmas), params),
            len(sigmas) + 1.0,
            {"source": "sampled", "sampler": "cm", "sigmas": list(sigmas)},
        )  # fmt: skip
        for name, sigmas in (
            (SETTING_1STEP, (float(model.sigma_max),)),
            (SETTING_2STEP, (float(model.sigma_max), tau)),
        )
    ]
    clock = time.perf_counter()
    jobs = [job for setting in settings for job in _jobs(setting, reference, params, ctx)]
    progress = _Progress(ctx, sum(j.cost * sum(w.stop - w.start for w in j.works) for j in jobs), "sampling")
    _run(jobs, params, ctx, progress)
    timing["sampling"] = time.perf_counter() - clock
    results: dict[str, dict[str, Any]] = {}
    for setting in settings:
        results[setting.name], grid = _entry(setting)
        if grid.shape[0]:
            save_grid(grid, ctx.out_dir / f"grid-{setting.name}.png", cols=params.grid_size)

    fid, fid_inf, kid, precision, recall = (medians(results, m) for m in METRICS)
    ratio, ratio_inf = ratios(fid), ratios(fid_inf)
    plot(
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
            "digest": info.digest,
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
        "ratios": ratio,
        "fid_inf": fid_inf,
        "ratios_inf": ratio_inf,
        "kid": {"subsets": params.kid_subsets, "subset_size": params.kid_subset_size},
        "precision_recall": {"k": params.pr_k, "max_samples": params.pr_max_samples},
    }
    (ctx.out_dir / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False))
    ctx.log_timing(**{f"{name}_s": round(seconds, 3) for name, seconds in timing.items()})
    return {
        "fid_1step": fid[SETTING_1STEP],
        "fid_2step": fid[SETTING_2STEP],
        "fid_teacher": fid.get(SETTING_TEACHER),
        "ratio_1step": ratio["1step"],
        "ratio_2step": ratio["2step"],
        "ratio_1step_inf": ratio_inf["1step"],
        "ratio_2step_inf": ratio_inf["2step"],
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
