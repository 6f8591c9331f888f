"""Dataset sources, split into items that decode independently (so ``prepare_data`` can spread them over Ray).

:func:`open_source` inspects a source once -- lists an image folder, reads a CIFAR-10 tarball's member
list and batches, opens an npz -- and returns a :class:`Source`: how many items it has, their image shape,
classes, and a picklable :meth:`Source.decode` that turns a chunk of item indices into uint8 (n, C, H, W)
images (resized when asked) and labels. Decoding a chunk needs only the chunk's own inputs (its files'
paths, or references to shared arrays in Ray's object store), so chunks run in parallel Ray Data tasks.

* ``sklearn-digits``: the 1797 8x8 digits that ship inside scikit-learn (values 0..16 -> round(v 255 / 16)).
* ``cifar10``: the CIFAR-10 "python version" tarball (``cifar-10-python.tar.gz``): its five training
  batches ``data_batch_1..5`` (50 000 images), unpickled with :func:`cmflow.data.safe_pickle.restricted_loads`
  only; a member outside the genuine layout, or a missing batch, is refused.
* ``image-folder``: PNG / JPEG files under a folder (recursively); the class is the first sub-folder name;
  grey only when every probed image is grey (a few grey photos in a colour dataset stay RGB).
* ``npz``: a numpy ``.npz`` with ``images`` (or ``x`` / ``arr_0``) and optional ``labels`` (``y`` /
  ``arr_1``), NCHW or NHWC, read with ``allow_pickle=False`` (the arrays are read into memory once).

Unreadable or corrupt input raises :class:`cmflow.errors.InputError` naming the file and the fix. Nothing
here writes anything.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from cmflow.data.images import check_images, resize_images
from cmflow.data.safe_pickle import UnsafePickleError, restricted_loads
from cmflow.errors import InputError
from cmflow.redact import redact_uri
from cmflow.storage import open_uri

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MODE_PROBES = 32  # images inspected (spread over the sorted list) to decide grey or RGB
SOURCES = ("sklearn-digits", "cifar10", "image-folder", "npz")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_OTHER = ("test_batch", "batches.meta", "readme.html")


def _indices(chunk: bytes) -> np.ndarray:
    return np.frombuffer(chunk, dtype=np.int64)


@dataclass
class Source:
    """A dataset split into items; ``decode(indices)`` -> (uint8 (n, C, H, W), int64 (n,) labels or None)."""

    name: str
    num_items: int
    shape: tuple[int, int, int]  # (C, H, W) after any resize
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    has_labels: bool = False

    def chunk(self, indices: np.ndarray) -> dict[str, Any]:
        """What a task needs to decode these items (a Ray Data row): by default just their indices."""
        return {"indices": np.ascontiguousarray(indices, dtype=np.int64).tobytes()}

    def decode(self, chunk: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def for_tasks(self) -> Source:
        """What the decode tasks receive: the source without per-item lists that chunks already carry."""
        return self


@dataclass
class ArraySource(Source):
    """Images (and labels) already in memory -- or in Ray's object store -- selected by index."""

    images: Any = None  # uint8 (N, C, H, W)
    labels: Any = None  # int64 (N,), or None
    resolution: int | None = None

    def decode(self, chunk: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        index = _indices(chunk["indices"])
        images = np.asarray(self.images)[index]
        if self.resolution is not None and images.shape[2:] != (self.resolution, self.resolution):
            images = resize_images(images, self.resolution)
        labels = np.asarray(self.labels)[index] if self.has_labels else None
        return images, labels


# -- sklearn digits ----------------------------------------------------------------------------------------


def read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 sklearn digits as uint8 (N, 1, 8, 8) (values 0..16 scaled by 255/16, rounded) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return images, digits.target.astype(np.int64)


@dataclass
class DigitsSource(Source):
    resolution: int | None = None

    def decode(self, chunk: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        images, labels = read_sklearn_digits()
        index = _indices(chunk["indices"])
        picked = images[index]
        if self.resolution is not None and picked.shape[2:] != (self.resolution, self.resolution):
            picked = resize_images(picked, self.resolution)
        return picked, labels[index] if self.has_labels else None


def open_digits(resolution: int | None, use_labels: bool) -> DigitsSource:
    images, _ = read_sklearn_digits()
    side = resolution or images.shape[2]
    return DigitsSource(
        "sklearn-digits", images.shape[0], (1, side, side), 10 if use_labels else 0,
        [str(i) for i in range(10)] if use_labels else [], use_labels, resolution,
    )  # fmt: skip


# -- CIFAR-10 ----------------------------------------------------------------------------------------------


def _cifar_members(archive: tarfile.TarFile, where: str) -> dict[str, tarfile.TarInfo]:
    try:
        members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{where}: the tar archive is corrupt ({exc}); download it again") from None
    found: dict[str, tarfile.TarInfo] = {}
    for member in members:
        path = PurePosixPath(member.name)
        if member.isdir() and path.parts == (CIFAR_DIR,):
            continue
        if not member.isfile() or len(path.parts) != 2 or path.parts[0] != CIFAR_DIR:
            raise InputError(
                f"{where} holds {member.name!r}, which the CIFAR-10 python tarball does not; pass the genuine "
                "cifar-10-python.tar.gz"
            )
        if path.name not in CIFAR_BATCHES + CIFAR_OTHER:
            raise InputError(
                f"{where} holds a foreign member {member.name!r}; pass the genuine cifar-10-python.tar.gz"
            )
        found[path.name] = member
    missing = [name for name in CIFAR_BATCHES if name not in found]
    if missing and len(missing) == len(CIFAR_BATCHES):
        raise InputError(
            f"{where} has no data_batch_* members; pass the CIFAR-10 *python* tarball (cifar-10-python.tar.gz)"
        )
    if missing:
        raise InputError(
            f"{where} is missing {CIFAR_DIR}/{missing[0]}; the tarball is incomplete, download it again"
        )
    return found


def _cifar_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
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


def open_cifar10(uri: str, options: dict[str, Any], resolution: int | None, use_labels: bool) -> ArraySource:
    """The five training batches of a CIFAR-10 python tarball, checked and decoded once (150 MB)."""
    where = redact_uri(uri)
    data = open_uri(uri, options)
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(
            f"{where} is not a readable tar archive ({exc}); pass the CIFAR-10 python tarball"
        ) from None
    images, labels = [], []
    with archive:
        members = _cifar_members(archive, where)
        for name in CIFAR_BATCHES:
            label = f"{where}:{CIFAR_DIR}/{name}"
            try:
                handle = archive.extractfile(members[name])
                raw = handle.read() if handle is not None else b""
            except (tarfile.TarError, EOFError, OSError, zipfile.BadZipFile) as exc:
                raise InputError(
                    f"{label} cannot be read ({exc}); the tarball is truncated or corrupt"
                ) from None
            batch_images, batch_labels = _cifar_batch(raw, label)
            images.append(batch_images)
            labels.append(batch_labels)
    side = resolution or 32
    return ArraySource(
        "cifar10",
        sum(len(i) for i in images),
        (3, side, side),
        10 if use_labels else 0,
        CIFAR_CLASSES if use_labels else [],
        use_labels,
        images=np.concatenate(images),
        labels=np.concatenate(labels) if use_labels else None,
        resolution=resolution,
    )


# -- image folders ---------------------------------------------------------------------------------------


def _picture(data: bytes, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as handle:
            handle.load()
            return handle.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{where} is not a readable PNG/JPEG image ({exc}); remove or fix it") from None


def _picture_array(picture: Any, grey: bool, resolution: int | None) -> np.ndarray:
    """A Pillow image -> uint8 (C, H, W), centre-cropped and resized when ``resolution`` is set."""
    picture = picture.convert("L" if grey else "RGB")
    array = np.asarray(picture, dtype=np.uint8)
    array = array[None] if grey else array.transpose(2, 0, 1)
    if resolution is not None:
        array = resize_images(array[None], resolution)[0]
    return array


@dataclass
class ImageFolderSource(Source):
    uri: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)  # relative to uri, sorted
    labels: list[int] = field(default_factory=list)
    grey: bool = False
    resolution: int | None = None

    def for_tasks(self) -> Source:
        return replace(self, paths=[], labels=[])

    def chunk(self, indices: np.ndarray) -> dict[str, Any]:
        return {
            "paths": "\n".join(self.paths[int(i)] for i in indices),
            "labels": np.asarray(
                [self.labels[int(i)] for i in indices] if self.has_labels else [], np.int64
            ).tobytes(),
        }

    def decode(self, chunk: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.uri, **self.options)
        root = root.rstrip("/")
        where = redact_uri(self.uri).rstrip("/")
        arrays = []
        for rel in str(chunk["paths"]).split("\n"):
            try:
                data = fs.cat_file(f"{root}/{rel}")
            except (FileNotFoundError, OSError) as exc:
                raise InputError(f"{where}/{rel} cannot be read ({exc}); remove or fix it") from None
            array = _picture_array(_picture(data, f"{where}/{rel}"), self.grey, self.resolution)
            if array.shape != self.shape:
                raise InputError(
                    f"{where}/{rel} is {array.shape} but the first image is {self.shape}; images differ in size, "
                    "so set params.resolution to resize them"
                )
            arrays.append(array)
        labels = np.frombuffer(chunk["labels"], dtype=np.int64) if self.has_labels else None
        return np.stack(arrays), labels


def open_image_folder(
    uri: str, options: dict[str, Any], resolution: int | None, use_labels: bool
) -> ImageFolderSource:
    """The PNG/JPEG files under ``uri`` (sorted); the first one decides grey or RGB (and the size)."""
    import fsspec

    where = redact_uri(uri).rstrip("/")
    try:
        fs, root = fsspec.core.url_to_fs(uri, **options)
        if not fs.isdir(root):
            raise InputError(f"{where} is not a folder; pass the folder that holds the images")
        found = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
    except (ValueError, ImportError) as exc:
        raise InputError(f"cannot open {where}: {exc}; use a path, file:// or s3:// URI") from None
    except FileNotFoundError:
        raise InputError(f"{where} does not exist; check the URI") from None
    if not found:
        raise InputError(f"{where} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    root = root.rstrip("/")
    rel = [p[len(root) + 1 :] if p.startswith(root + "/") else p for p in found]
    nested = [len(PurePosixPath(r).parts) > 1 for r in rel]
    if any(nested) and not all(nested):
        loose = next(r for r, n in zip(rel, nested, strict=True) if not n)
        raise InputError(
            f"{where}: {loose} sits next to class folders; put every image in a class sub-folder, or none"
        )
    probes = sorted({int(i) for i in np.linspace(0, len(found) - 1, min(len(found), MODE_PROBES))})
    pictures = [_picture(fs.cat_file(found[i]), f"{where}/{rel[i]}") for i in probes]
    grey = all(p.mode in {"1", "L", "I", "I;16", "F"} for p in pictures)
    shape = _picture_array(pictures[0], grey, resolution).shape
    names = sorted({PurePosixPath(r).parts[0] for r in rel}) if all(nested) and use_labels else []
    index = {name: i for i, name in enumerate(names)}
    labels = [index[PurePosixPath(r).parts[0]] for r in rel] if names else []
    return ImageFolderSource(
        "image-folder", len(rel), tuple(shape), len(names), names, bool(names),  # type: ignore[arg-type]
        uri=uri, options=options, paths=rel, labels=labels, grey=grey, resolution=resolution,
    )  # fmt: skip


# -- npz -------------------------------------------------------------------------------------------------------


def read_npz(data: bytes, where: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file's bytes, refusing pickled (object) arrays; InputError otherwise."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise InputError(f"{where} is a single .npy array, not an .npz; save it with numpy.savez")
            return {name: np.asarray(npz[name]) for name in npz.files}
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        reason = (
            "it holds pickled (object) arrays" if "pickled" in str(exc) else f"{type(exc).__name__}: {exc}"
        )
        raise InputError(
            f"{where} is not a readable .npz file ({reason}); write it with numpy.savez from plain numeric arrays"
        ) from None


def open_npz(uri: str, options: dict[str, Any], resolution: int | None, use_labels: bool) -> ArraySource:
    """A ``.npz`` with images (uint8 NCHW / NHWC / NHW) and optional integer labels (no pickles)."""
    where = redact_uri(uri)
    arrays = read_npz(open_uri(uri, options), where)
    keys = list(arrays)
    image_key = next((k for k in ("images", "x", "arr_0", "data") if k in keys), None)
    if image_key is None:
        raise InputError(
            f"{where} has no 'images' (or 'x' / 'arr_0') array; it has: {', '.join(keys)}; name the images "
            "array 'images'"
        )
    images = arrays[image_key]
    label_key = next((k for k in ("labels", "y", "arr_1") if k in keys), None)
    labels = arrays[label_key] if label_key is not None else None
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
    keep = use_labels and labels is not None
    side = resolution or images.shape[2]
    return ArraySource(
        "npz", images.shape[0], (images.shape[1], side, side), num_classes if keep else 0, [], keep,
        images=images, labels=labels if keep else None, resolution=resolution,
    )  # fmt: skip


def open_source(
    source: str, uri: str | None, options: dict[str, Any], resolution: int | None, use_labels: bool = True
) -> Source:
    """Inspect ``source`` (one of :data:`SOURCES`) and return it split into decodable items."""
    if source == "sklearn-digits":
        return open_digits(resolution, use_labels)
    if source not in SOURCES or uri is None:
        raise InputError(f"unknown dataset source {source!r}; choose one of {', '.join(SOURCES)}")
    openers = {"cifar10": open_cifar10, "image-folder": open_image_folder, "npz": open_npz}
    return openers[source](uri, options, resolution, use_labels)


def decode_all(source: Source) -> tuple[np.ndarray, np.ndarray | None]:
    """Every item of a (small) source in source order, decoded here (tools and tests)."""
    return source.decode(source.chunk(np.arange(source.num_items)))
