"""``cmflow fid stats IMAGES`` and ``cmflow fid score IMAGES --ref REF``: ad-hoc FID outside a pipeline.

IMAGES is a ``.npz`` (array ``images``, else the first array; uint8 NCHW, NHWC or NHW) or a folder of
PNG/JPEG files, as a local path or any fsspec URI. REF is a statistics ``.npz`` (``mu``, ``sigma``: written by
``cmflow fid stats``, by the evaluate stage's cache, or by TTUR / EDM / OpenAI tools) or a second IMAGES.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Ad-hoc FID: reference statistics and scores for an .npz or an image folder.", no_args_is_help=True
)

ExtractorOpt = Annotated[
    str,
    typer.Option("--extractor", "-e", help="Feature network: digits (shipped, 8x8 grey) or inception-v3."),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights", "-w", help="Extractor weights URI (required for inception-v3; default digits: shipped)."
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per extractor call.")]
ImagesArg = Annotated[
    str,
    typer.Argument(
        help="An .npz of uint8 images or an image folder (path or URI).", metavar="IMAGES", show_default=False
    ),
]

EXTRACTOR_NAMES = ("digits", "inception-v3")


# -- reading ---------------------------------------------------------------------------------------------------


def _is_folder(uri: str) -> bool:
    import fsspec

    from cmflow.errors import InputError

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        return bool(fs.isdir(path))
    except (ValueError, ImportError) as exc:
        raise InputError(f"cannot open {uri}: {exc}; use a path, file:// or s3:// URI") from None


def _images_from_arrays(arrays: dict[str, Any], where: str) -> Any:
    """uint8 (N, C, H, W) from an .npz's ``images`` array (or its first one)."""
    import numpy as np

    from cmflow.data.images import check_images
    from cmflow.errors import InputError

    if not arrays:
        raise InputError(f"{where} holds no arrays; save the images as numpy.savez(path, images=...)")
    if "images" not in arrays and {"mu", "sigma"} <= set(arrays):
        raise InputError(f"{where} holds reference statistics (mu, sigma), not images; pass it as --ref")
    images = arrays["images"] if "images" in arrays else next(iter(arrays.values()))
    if images.ndim == 3:
        images = images[:, None]  # (N, H, W) grey
    if images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if images.dtype != np.uint8:
        raise InputError(
            f"{where}: images are {images.dtype}; store them as uint8 in [0, 255] "
            "(e.g. ((x + 1) * 127.5).round().clip(0, 255).astype('uint8'))"
        )
    return check_images(images, where)


def load_images(uri: str) -> Any:
    """uint8 (N, C, H, W) images of an .npz or an image folder at ``uri``."""
    from cmflow.data.sources import decode_all, open_image_folder, read_npz
    from cmflow.redact import redact_uri
    from cmflow.storage import open_uri

    if _is_folder(uri):
        return decode_all(open_image_folder(uri, {}, None, use_labels=False))[0]
    return _images_from_arrays(read_npz(open_uri(uri), redact_uri(uri)), redact_uri(uri))


def _load_ref(uri: str) -> tuple[Any | None, Any | None]:
    """(ReferenceStats, None) for a statistics .npz, or (None, images) for images."""
    from cmflow.data.sources import read_npz
    from cmflow.metrics.reference import stats_from_bytes
    from cmflow.redact import redact_uri
    from cmflow.storage import open_uri

    if _is_folder(uri):
        return None, load_images(uri)
    data = open_uri(uri)
    arrays = read_npz(data, redact_uri(uri))
    if {"mu", "sigma"} <= set(arrays) and "images" not in arrays:
        return stats_from_bytes(data), None
    return None, _images_from_arrays(arrays, redact_uri(uri))


def _extractor(name: str, weights: str | None) -> Any:
    import pickle

    from cmflow.errors import InputError, UsageError
    from cmflow.storage import open_uri

    if name not in EXTRACTOR_NAMES:
        raise UsageError(f"--extractor {name!r} is unknown; choose one of {', '.join(EXTRACTOR_NAMES)}")
    if name == "inception-v3" and not weights:
        raise UsageError(
            "--extractor inception-v3 needs --weights URI (the standard pt_inception-2015-12-05-6726825d.pth); "
            "nothing is downloaded"
        )
    from cmflow.metrics.extractors import load_extractor

    data = open_uri(weights) if weights else None
    try:
        return load_extractor(name, data)
    except (ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InputError(
            f"cannot load the {name} extractor weights: {first}; pass the matching --weights file"
        ) from None


def _features(extractor: Any, images: Any, batch_size: int, keep: bool, label: str) -> Any:
    """FeatureStats of ``images`` with a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import Progress

    from cmflow.errors import InputError
    from cmflow.metrics.extractors import compute_stats

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"features of {label}", total=int(images.shape[0]))
        try:
            return compute_stats(
                extractor,
                images,
                batch_size=batch_size,
                keep_features=keep,
                on_batch=lambda n: bar.advance(task, n),
            )
        except ValueError as exc:
            hint = (
                "; use --extractor inception-v3 --weights URI for other sizes"
                if extractor.name == "digits"
                else ""
            )
            raise InputError(f"{label}: {exc}{hint}") from None


def _check_ref(ref: Any, extractor: Any) -> None:
    from cmflow.errors import UsageError

    meta = ref.meta or {}
    if meta.get("extractor") and meta["extractor"] != extractor.name:
        raise UsageError(
            f"--ref was computed with the {meta['extractor']} extractor; pass --extractor {meta['extractor']}"
        )
    sha = meta.get("extractor_sha256")
    if sha and sha != extractor.weights_sha256:
        raise UsageError(
            f"--ref was computed with other {extractor.name} weights (sha256 {sha[:12]}, these are "
            f"{extractor.weights_sha256[:12]}); pass the same --weights"
        )
    if ref.mu.shape[0] != extractor.num_features:
        raise UsageError(
            f"--ref has {ref.mu.shape[0]}-d statistics but {extractor.name} gives {extractor.num_features}-d "
            "features; pass the extractor it was computed with"
        )


def _subset(features: Any, m: int) -> Any:
    """``m`` rows of ``features`` chosen by a fixed permutation (files are often sorted by class)."""
    import numpy as np

    return features[np.sort(np.random.default_rng(0).permutation(features.shape[0])[:m])]


# -- commands --------------------------------------------------------------------------------------------------


@app.command("stats")
def stats(
    images: ImagesArg,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Where to write the statistics .npz (path or URI).")
    ],
    extractor: ExtractorOpt = "digits",
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 256,
) -> None:
    """Write the feature statistics (mu, sigma, n) of IMAGES to --out, for `cmflow fid score --ref`."""
    import fsspec

    from cmflow.data.images import dataset_digest
    from cmflow.errors import UsageError
    from cmflow.metrics.reference import stats_digest, stats_to_bytes
    from cmflow.redact import redact_uri

    net = _extractor(extractor, weights)
    pictures = load_images(images)
    feats = _features(net, pictures, batch_size, keep=False, label=redact_uri(images))
    if feats.n < 2:
        raise UsageError(f"{redact_uri(images)} holds {feats.n} image; statistics need at least 2")
    mu, sigma = feats.to_moments()
    meta = {
        "source": redact_uri(images),
        "extractor": net.name,
        "extractor_sha256": net.weights_sha256,
        "num_images": int(feats.n),
        "resolution": int(pictures.shape[2]),
        "channels": int(pictures.shape[1]),
        "dataset_digest": dataset_digest(pictures, None),
    }
    data = stats_to_bytes(mu, sigma, feats.n, meta)
    try:
        with fsspec.open(out, "wb") as handle:
            handle.write(data)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot write --out {redact_uri(out)} ({exc}); pass a writable path or URI"
        ) from None
    typer.echo(
        f"wrote {redact_uri(out)}: {feats.n} images, {mu.shape[0]}-d {net.name} features, "
        f"sha256 {stats_digest(data)[:16]}"
    )


@app.command("score")
def score(
    images: ImagesArg,
    ref: Annotated[
        str, typer.Option("--ref", "-r", help="Reference: a statistics .npz, or a second IMAGES.")
    ],
    extractor: ExtractorOpt = "digits",
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 256,
    kid_subsets: Annotated[int, typer.Option("--kid-subsets", min=1, help="KID subsets of 1000 rows.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Print FID of IMAGES against --ref (and KID, precision/recall when --ref holds images too)."""
    from cmflow.errors import UsageError
    from cmflow.metrics.stats import fid_from_stats, kid, precision_recall
    from cmflow.redact import redact_uri

    net = _extractor(extractor, weights)
    ref_stats, ref_images = _load_ref(ref)
    if ref_stats is not None:
        _check_ref(ref_stats, net)
    fake = _features(
        net, load_images(images), batch_size, keep=ref_images is not None, label=redact_uri(images)
    )
    if fake.n < 2:
        raise UsageError(f"{redact_uri(images)} holds {fake.n} image; FID needs at least 2")
    result: dict[str, Any] = {
        "images": redact_uri(images),
        "ref": redact_uri(ref),
        "extractor": net.name,
        "extractor_sha256": net.weights_sha256,
        "num_images": int(fake.n),
    }
    if ref_stats is not None:
        mu_ref, sigma_ref, result["num_ref"] = ref_stats.mu, ref_stats.sigma, int(ref_stats.n)
    else:
        real = _features(net, ref_images, batch_size, keep=True, label=redact_uri(ref))
        if real.n < 2:
            raise UsageError(f"--ref {redact_uri(ref)} holds {real.n} image; FID needs at least 2")
        (mu_ref, sigma_ref), result["num_ref"] = real.to_moments(), int(real.n)
        result["kid"], result["kid_std"] = kid(fake.features, real.features, num_subsets=kid_subsets)
        if min(real.n, fake.n) > 3:  # equal-size random subsets: k-NN radii depend on the sample size
            m = min(real.n, fake.n)
            result["precision"], result["recall"] = precision_recall(
                _subset(real.features, m), _subset(fake.features, m), k=3
            )
    result["fid"] = fid_from_stats(*fake.to_moments(), mu_ref, sigma_ref)
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
        return
    extra = "".join(f"  {k} {result[k]:.4g}" for k in ("kid", "precision", "recall") if k in result)
    typer.echo(
        f"FID {result['fid']:.4f}{extra}  ({result['num_images']} images vs {result['num_ref']} reference, "
        f"{net.name} {net.weights_sha256[:8]})"
    )
