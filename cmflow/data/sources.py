"""Dataset sources: read images (and class labels) from sklearn's digits or from any fsspec URI.

Every reader returns a :class:`RawDataset` of uint8 (N, C, H, W) images. Unreadable or corrupt input raises
:class:`cmflow.errors.InputError` naming the file and the problem. Nothing here writes anything.

* ``sklearn-digits``: the 1797 8x8 digits that ship inside scikit-learn (values 0..16 -> round(v 255 / 16)).
* ``cifar10``: the CIFAR-10 "python version" tarball (``cifar-10-python.tar.gz``); the training batches
  ``data_batch_*`` (50 000 images), unpickled with :func:`cmflow.data.safe_pickle.restricted_loads` only.
* ``image-folder``: PNG / JPEG files under a folder; the class is the first sub-folder name.
* ``npz``: a numpy ``.npz`` with ``images`` (or ``x`` / ``arr_0``) and optional ``labels`` (``y`` /
  ``arr_1``), NCHW or NHWC, read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import pickle
import re
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from cmflow.data.images import check_images, resize_images
from cmflow.data.safe_pickle import UnsafePickleError, restricted_loads
from cmflow.errors import InputError
from cmflow.redact import redact_uri
from cmflow.storage import open_uri

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_BATCH_RE = re.compile(r"(^|/)data_batch_\d+$")


@dataclass
class RawDataset:
    """Images as read from a source, before the optional resize / flips / max_images."""

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray | None  # int64 (N,) or None
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)


def read_sklearn_digits() -> RawDataset:
    """The scikit-learn digits: (1797, 1, 8, 8) uint8 scaled from 0..16 by 255/16 (rounded), labels 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return RawDataset(images, digits.target.astype(np.int64), 10, [str(i) for i in range(10)])


def read_cifar10(uri: str, options: dict[str, Any]) -> RawDataset:
    """The training split (``data_batch_*``) of a CIFAR-10 python tarball at ``uri``."""
    data = open_uri(uri, options)
    where = redact_uri(uri)
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(
            f"{where} is not a readable tar archive ({exc}); pass the CIFAR-10 python tarball"
        ) from None
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with archive:
        try:
            members = sorted(
                (m for m in archive.getmembers() if m.isfile() and _BATCH_RE.search(m.name)),
                key=lambda m: m.name,
            )
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InputError(f"{where}: the tar archive is corrupt ({exc}); download it again") from None
        if not members:
            raise InputError(
                f"{where} has no data_batch_* members; pass the CIFAR-10 *python* tarball (cifar-10-python.tar.gz)"
            )
        for member in members:
            batch_images, batch_labels = _cifar_batch(archive, member, where)
            images.append(batch_images)
            labels.append(batch_labels)
    return RawDataset(
        np.concatenate(images),
        np.concatenate(labels),
        10,
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    )


def _cifar_batch(
    archive: tarfile.TarFile, member: tarfile.TarInfo, where: str
) -> tuple[np.ndarray, np.ndarray]:
    name = f"{where}:{member.name}"
    try:
        handle = archive.extractfile(member)
        raw = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{name} cannot be read ({exc}); the tarball is truncated or corrupt") from None
    try:
        batch = restricted_loads(raw)
    except UnsafePickleError as exc:
        raise InputError(f"{name} was refused: {exc}; only genuine CIFAR-10 batches are accepted") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        UnicodeDecodeError,
    ) as exc:
        raise InputError(
            f"{name} is not a valid pickled CIFAR-10 batch ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise InputError(f"{name} is not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, batch_labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise InputError(
            f"{name}: b'data' must be a uint8 (N, 3072) array, got {type(data).__name__} {shape}"
        )
    labels = np.asarray(batch_labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{name}: b'labels' must hold {data.shape[0]} integers")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise InputError(f"{name}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_image_folder(uri: str, options: dict[str, Any], resolution: int | None) -> RawDataset:
    """PNG/JPEG images under the folder ``uri`` (recursively); class = first sub-folder (sorted names)."""
    import fsspec
    from PIL import Image, UnidentifiedImageError

    where = redact_uri(uri)
    try:
        fs, root = fsspec.core.url_to_fs(uri, **options)
        if not fs.isdir(root):
            raise InputError(f"{where} is not a folder; pass the folder that holds the images")
        paths = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
    except (ValueError, ImportError) as exc:
        raise InputError(f"cannot open {where}: {exc}; use a path, file:// or s3:// URI") from None
    except FileNotFoundError:
        raise InputError(f"{where} does not exist; check the URI") from None
    if not paths:
        raise InputError(f"{where} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    root = root.rstrip("/")
    rel = [PurePosixPath(p[len(root) + 1 :] if p.startswith(root + "/") else p) for p in paths]
    nested = [len(r.parts) > 1 for r in rel]
    if any(nested) and not all(nested):
        loose = next(r for r, n in zip(rel, nested, strict=True) if not n)
        raise InputError(
            f"{where}: {loose} sits next to class folders; put every image in a class sub-folder, or none"
        )
    pictures = []
    for path, relpath in zip(paths, rel, strict=True):
        try:
            with Image.open(io.BytesIO(fs.cat_file(path))) as handle:
                handle.load()
                pictures.append(handle.copy())
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(
                f"{where}/{relpath} is not a readable PNG/JPEG image ({exc}); remove or fix it"
            ) from None
    grey = all(p.mode in {"1", "L", "I", "I;16", "F"} for p in pictures)
    arrays = [_picture_array(p, grey, resolution) for p in pictures]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        odd = next(r for r, a in zip(rel, arrays, strict=True) if a.shape != arrays[0].shape)
        raise InputError(
            f"{where}/{odd} is {arrays[0].shape} vs {sorted(sizes)[0]} elsewhere; images differ in size, so set "
            "params.resolution to resize them"
        )
    images = np.stack(arrays)
    if not any(nested):
        return RawDataset(images, None)
    names = sorted({r.parts[0] for r in rel})
    index = {name: i for i, name in enumerate(names)}
    labels = np.asarray([index[r.parts[0]] for r in rel], dtype=np.int64)
    return RawDataset(images, labels, len(names), names)


def _picture_array(picture: Any, grey: bool, resolution: int | None) -> np.ndarray:
    """A Pillow image -> uint8 (C, H, W), centre-cropped and resized when ``resolution`` is set."""
    picture = picture.convert("L" if grey else "RGB")
    array = np.asarray(picture, dtype=np.uint8)
    array = array[None] if grey else array.transpose(2, 0, 1)
    if resolution is not None:
        array = resize_images(array[None], resolution)[0]
    return array


def read_npz(uri: str, options: dict[str, Any]) -> RawDataset:
    """A ``.npz`` with images (uint8 NCHW / NHWC / NHW) and optional integer labels (no pickles)."""
    where = redact_uri(uri)
    data = open_uri(uri, options)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            keys = list(npz.files)
            image_key = next((k for k in ("images", "x", "arr_0", "data") if k in keys), None)
            if image_key is None:
                raise InputError(
                    f"{where} has no 'images' (or 'x' / 'arr_0') array; it has: {', '.join(keys)}"
                )
            images = np.asarray(npz[image_key])
            label_key = next((k for k in ("labels", "y", "arr_1") if k in keys), None)
            labels = np.asarray(npz[label_key]) if label_key is not None else None
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise InputError(f"{where} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if images.dtype != np.uint8:
        raise InputError(f"{where}: images are {images.dtype}; store them as uint8 in [0, 255]")
    images = check_images(images, where)
    num_classes = 0
    if labels is not None:
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"{where}: labels must be {images.shape[0]} integers, got {labels.dtype} {labels.shape}"
            )
        if labels.min() < 0:
            raise InputError(f"{where}: labels must be >= 0, got {labels.min()}")
        labels = labels.astype(np.int64)
        num_classes = int(labels.max()) + 1
    return RawDataset(images, labels, num_classes)


SOURCES: dict[str, Callable[..., RawDataset]] = {
    "sklearn-digits": lambda uri, options, resolution: read_sklearn_digits(),
    "cifar10": lambda uri, options, resolution: read_cifar10(uri, options),
    "image-folder": read_image_folder,
    "npz": lambda uri, options, resolution: read_npz(uri, options),
}


def read_source(source: str, uri: str | None, options: dict[str, Any], resolution: int | None) -> RawDataset:
    """Read ``source`` (a key of :data:`SOURCES`); the image folder reader resizes while it reads."""
    if source not in SOURCES:
        raise InputError(f"unknown dataset source {source!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[source](uri, options, resolution)
