"""prepare_data on each source, from small files the tests write, and on corrupt versions of each."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stage_helpers import artifact, committed, direct_ctx, run_stage

from cmflow.data.images import dataset_digest
from cmflow.data.shards import read_dataset
from cmflow.errors import InputError, SpecError, StageError
from cmflow.stages.prepare_data import PrepareDataParams, prepare_data
from cmflow.storage import Storage
from cmflow.validate import validate_spec


def _cifar_tarball(
    path: Path,
    per_batch: int = 4,
    batch: bytes | None = None,
    skip: str | None = None,
    extra: str | None = None,
) -> np.ndarray:
    """A CIFAR-10 python tarball: 5 training batches of ``per_batch`` images (the first can be replaced by
    ``batch``), the meta file, optionally one batch left out (``skip``) or a foreign member (``extra``)."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5 * per_batch, 3072), dtype=np.uint8)
    members = []
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        content = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": [int(i % 10) for i in range(rows.start, rows.stop)],
            b"data": data[rows],
            b"filenames": [f"img{i}.png".encode() for i in range(rows.start, rows.stop)],
        }
        payload = batch if (batch is not None and b == 0) else pickle.dumps(content, protocol=2)
        members.append((f"cifar-10-batches-py/data_batch_{b + 1}", payload))
    members.append(("cifar-10-batches-py/batches.meta", pickle.dumps({b"num_cases_per_batch": per_batch})))
    if extra:
        members.append((extra, b"#!/bin/sh\n"))
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in members:
            if skip and name.endswith(skip):
                continue
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return data.reshape(-1, 3, 32, 32)


def _load(storage: Storage, manifest) -> tuple[np.ndarray, np.ndarray | None, dict]:
    return read_dataset(artifact(storage, manifest).read_bytes)


def _rows(images: np.ndarray, labels: np.ndarray | None) -> list[bytes]:
    """The dataset as a sorted multiset of (image, label) rows (order-free comparison)."""
    keys = [img.tobytes() + (b"" if labels is None else int(lab).to_bytes(8, "little")) for img, lab in
            zip(images, labels if labels is not None else [0] * len(images), strict=True)]  # fmt: skip
    return sorted(keys)


def test_sklearn_digits_scaled_to_uint8(local_storage: Storage) -> None:
    from sklearn.datasets import load_digits

    source = load_digits()
    expected = np.round(source.images * (255 / 16)).astype(np.uint8)[:, None]
    manifest = run_stage(local_storage, "prepare_data", {"source": "sklearn-digits", "shuffle": False})
    images, labels, info = _load(local_storage, manifest)
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    assert np.array_equal(images, expected) and np.array_equal(labels, source.target)  # source order
    assert info["num_classes"] == 10 and info["digest"] == dataset_digest(images, labels)
    assert manifest.meta == {
        k: info[k] for k in ("num_images", "channels", "resolution", "num_classes", "digest")
    }
    assert sorted(manifest.files) == ["dataset.json", "shards/images-00000.npy", "shards/labels-00000.npy"]
    shuffled = run_stage(local_storage, "prepare_data", {"source": "sklearn-digits"})  # the default
    mixed, mixed_labels, mixed_info = _load(local_storage, shuffled)
    assert not np.array_equal(mixed, images)  # another order ...
    assert _rows(mixed, mixed_labels) == _rows(images, labels)  # ... of the same (image, label) rows
    assert mixed_info["digest"] == dataset_digest(mixed, mixed_labels) != info["digest"]


def test_fixed_size_shards_and_their_digest(local_storage: Storage) -> None:
    manifest = run_stage(
        local_storage, "prepare_data", {"source": "sklearn-digits", "shard_images": 500, "max_images": 1200}
    )
    info = artifact(local_storage, manifest).read_json("dataset.json")
    assert [s["count"] for s in info["shards"]] == [500, 500, 200] and info["shard_images"] == 500
    images, labels, _ = _load(local_storage, manifest)
    assert images.shape[0] == 1200 and info["digest"] == dataset_digest(images, labels)


def test_cifar10_tarball_with_resize_flips_and_max_images(local_storage: Storage, tmp_path: Path) -> None:
    tarball = tmp_path / "cifar-10-python.tar.gz"
    data = _cifar_tarball(tarball)
    params = {"source": "cifar10", "uri": str(tarball), "shuffle": False}
    manifest = run_stage(local_storage, "prepare_data", params)
    images, labels, info = _load(local_storage, manifest)
    assert np.array_equal(images, data) and list(labels) == [i % 10 for i in range(20)]
    assert info["class_names"][0] == "airplane"
    manifest = run_stage(
        local_storage,
        "prepare_data",
        {**params, "uri": f"file://{tarball}", "resolution": 16, "hflip": True, "max_images": 5},
    )
    images, labels, info = _load(local_storage, manifest)
    assert images.shape == (10, 3, 16, 16) and list(labels) == [0, 1, 2, 3, 4] * 2
    assert np.array_equal(images[5:], images[:5, :, :, ::-1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"skip": "data_batch_3"}, "is missing cifar-10-batches-py/data_batch_3; the tarball is incomplete"),
        ({"extra": "cifar-10-batches-py/run.sh"}, "holds a foreign member 'cifar-10-batches-py/run.sh'"),
        ({"extra": "../escape"}, "holds '../escape', which the CIFAR-10 python tarball does not"),
    ],
)
def test_cifar10_tarball_with_a_missing_or_foreign_member(
    local_storage: Storage, tmp_path: Path, kwargs: dict, message: str
) -> None:
    tarball = tmp_path / "odd.tar.gz"
    _cifar_tarball(tarball, **kwargs)
    with pytest.raises(InputError, match="odd.tar.gz") as err:
        prepare_data(
            PrepareDataParams(source="cifar10", uri=str(tarball)),
            {},
            direct_ctx(local_storage, tmp_path, "prepare_data"),
        )
    assert message in str(err.value) and "\n" not in str(err.value)
    assert committed(local_storage, "prepare_data") == []


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x80\x02garbage that is not a pickle", "not a valid pickled CIFAR-10 batch"),
        (pickle.dumps({b"data": [1, 2, 3], b"labels": [0]}, protocol=2), "must be a uint8 (N, 3072) array"),
    ],
)
def test_cifar10_corrupt_batches_are_input_errors(
    local_storage: Storage, tmp_path: Path, payload: bytes, message: str
) -> None:
    tarball = tmp_path / "bad.tar.gz"
    _cifar_tarball(tarball, batch=payload)
    params = PrepareDataParams(source="cifar10", uri=str(tarball))
    with pytest.raises(InputError, match="data_batch_1") as err:
        prepare_data(params, {}, direct_ctx(local_storage, tmp_path, "prepare_data"))
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StageError, match="data_batch_1"):
        run_stage(local_storage, "prepare_data", params.model_dump())
    assert committed(local_storage, "prepare_data") == []


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (str(self.marker), "w"))


def test_cifar10_pickle_with_code_is_refused(local_storage: Storage, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _RunsCode(marker), b"labels": []}, protocol=2)
    tarball = tmp_path / "evil.tar.gz"
    _cifar_tarball(tarball, batch=payload)
    with pytest.raises(InputError, match=r"refused: global (io|builtins).open is not allowed"):
        prepare_data(
            PrepareDataParams(source="cifar10", uri=str(tarball)),
            {},
            direct_ctx(local_storage, tmp_path, "prepare_data"),
        )
    assert not marker.exists()


def test_cifar10_truncated_or_missing_tarball(local_storage: Storage, tmp_path: Path) -> None:
    tarball = tmp_path / "cifar.tar.gz"
    _cifar_tarball(tarball)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(tarball.read_bytes()[:300])
    ctx = direct_ctx(local_storage, tmp_path, "prepare_data")
    with pytest.raises(InputError, match="truncated.tar.gz"):
        prepare_data(PrepareDataParams(source="cifar10", uri=str(truncated)), {}, ctx)
    with pytest.raises(InputError, match="does not exist"):
        prepare_data(PrepareDataParams(source="cifar10", uri=str(tmp_path / "nope.tar.gz")), {}, ctx)


def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_image_folder_classes_from_subfolders(local_storage: Storage, tmp_path: Path) -> None:
    _image_folder(tmp_path / "imgs")
    manifest = run_stage(
        local_storage,
        "prepare_data",
        {"source": "image-folder", "uri": str(tmp_path / "imgs"), "shuffle": False},
    )
    images, labels, info = _load(local_storage, manifest)
    assert images.shape == (6, 1, 12, 12) and list(labels) == [0, 0, 0, 1, 1, 1]
    assert info["class_names"] == ["cat", "dog"] and info["num_classes"] == 2
    first = np.asarray(Image.open(tmp_path / "imgs" / "cat" / "0.png"))
    assert np.array_equal(images[0, 0], first)
    Image.fromarray(np.zeros((20, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "dog" / "rgb.jpg")
    manifest = run_stage(
        local_storage,
        "prepare_data",
        {"source": "image-folder", "uri": str(tmp_path / "imgs"), "resolution": 8, "use_labels": False},
    )
    images, labels, info = _load(local_storage, manifest)
    assert images.shape == (7, 3, 8, 8) and labels is None and info["num_classes"] == 0


def test_image_folder_corrupt_file_and_mixed_sizes(local_storage: Storage, tmp_path: Path) -> None:
    _image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ctx = direct_ctx(local_storage, tmp_path, "prepare_data")
    with pytest.raises(InputError, match=r"dog/broken.png is not a readable PNG/JPEG"):
        prepare_data(PrepareDataParams(source="image-folder", uri=str(tmp_path / "imgs")), {}, ctx)
    (tmp_path / "imgs" / "dog" / "broken.png").unlink()
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(tmp_path / "imgs" / "dog" / "odd.png")
    with pytest.raises(InputError, match="differ in size, so set params.resolution"):
        prepare_data(PrepareDataParams(source="image-folder", uri=str(tmp_path / "imgs")), {}, ctx)
    assert committed(local_storage, "prepare_data") == []


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_npz_nhwc_with_labels_on_s3(s3_root: tuple[str, dict], tmp_path: Path) -> None:
    import fsspec

    root, options = s3_root
    images = np.random.default_rng(2).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    uri = f"{root}/inputs/data.npz"
    with fsspec.open(uri, "wb", **options) as handle:
        handle.write(_npz_bytes(images=images, labels=np.arange(7) % 3))
    storage = Storage(root, options)
    params = {"source": "npz", "uri": uri, "storage_options": options, "shuffle": False}
    manifest = run_stage(storage, "prepare_data", params)
    got, labels, info = _load(storage, manifest)
    assert np.array_equal(got, images.transpose(0, 3, 1, 2)) and list(labels) == [0, 1, 2, 0, 1, 2, 0]
    assert info["num_classes"] == 3 and manifest.uri.startswith("s3://")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"PK\x03\x04 this is no zip", "not a readable .npz"),
        (_npz_bytes(images=np.zeros((2, 1, 4, 4), dtype=np.float32)), "store them as uint8"),
        (_npz_bytes(images=np.array([object(), object()], dtype=object)), "not a readable .npz"),
        (_npz_bytes(pixels=np.zeros((2, 1, 4, 4), dtype=np.uint8)), "has no 'images'"),
    ],
)
def test_npz_corrupt_versions(local_storage: Storage, tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(InputError, match="data.npz") as err:
        prepare_data(
            PrepareDataParams(source="npz", uri=str(path)),
            {},
            direct_ctx(local_storage, tmp_path, "prepare_data"),
        )
    assert message in str(err.value)
    with pytest.raises(StageError):
        run_stage(local_storage, "prepare_data", {"source": "npz", "uri": str(path)})
    assert committed(local_storage, "prepare_data") == []


def test_uri_is_required_except_for_digits() -> None:
    raw = {"name": "p", "stages": {"data": {"kind": "prepare_data", "params": {"source": "npz"}}}}
    with pytest.raises(SpecError, match="needs a uri"):
        validate_spec(raw)


def test_shards_stream_through_the_writer_and_read_back_by_rows(tmp_path: Path) -> None:
    from cmflow.data.shards import DatasetInfo, ShardWriter, read_rows

    images = np.random.default_rng(3).integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    writer = ShardWriter(tmp_path, 4, has_labels=True)
    for a, b in ((0, 3), (3, 7), (7, 10)):  # batches that do not line up with the shards
        writer.add(images[a:b], np.arange(a, b))
    info = writer.close(source="test", num_classes=10)
    assert [s["count"] for s in info["shards"]] == [4, 4, 2]
    assert info["digest"] == dataset_digest(images, np.arange(10))
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    got, labels, _ = read_dataset(read)
    assert np.array_equal(got, images) and list(labels) == list(range(10))
    rows, row_labels = read_rows(read, DatasetInfo.parse(info), 3, 9)
    assert np.array_equal(rows, images[3:9]) and list(row_labels) == list(range(3, 9))
    assert json.loads((tmp_path / "dataset.json").read_text())["num_images"] == 10
