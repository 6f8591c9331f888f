"""The params of the ``evaluate`` stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cmflow.stage import ParamsModel

#: left out of the cache key: they change how the work is cut, never a number
CACHE_IGNORE = ("batch_size", "feature_batch_size", "reuse_teacher", "num_tasks")


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
    num_tasks: int = Field(
        1,
        ge=1,
        le=1024,
        description="Ray tasks measuring at once, each with the stage's resources; every seed's samples are split "
        "over them and their float64 feature sums merged, so results do not depend on it.",
    )
    reference_images: int | None = Field(
        None,
        ge=2,
        description="Real images in the reference statistics (default: all of them; a fixed random subset "
        "otherwise, for rehearsals on a CPU).",
    )
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
