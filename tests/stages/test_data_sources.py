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


def _cifar_tarball(path: Path, num: int = 20, batch: bytes | None = None) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (num, 3072), dtype=np.uint8)
    content = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(i % 10) for i in range(num)],
        b"data": data,
        b"filenames": [f"img{i}.png".encode() for i in range(num)],
    }
    payload = batch if batch is not None else pickle.dumps(content, protocol=2)
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in (
            ("cifar-10-batches-py/data_batch_1", payload),
            ("cifar-10-batches-py/batches.meta", pickle.dumps({b"num_cases_per_batch": num})),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return data.reshape(num, 3, 32, 32)


def _load(storage: Storage, manifest) -> tuple[np.ndarray, np.ndarray | None, dict]:
    return read_dataset(artifact(storage, manifest).read_bytes)


def test_sklearn_digits_scaled_to_uint8(local_storage: Storage) -> None:
    manifest = run_stage(local_storage, "prepare_data", {"source": "sklearn-digits"})
    images, labels, info = _load(local_storage, manifest)
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    assert labels is not None and labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    assert info["num_classes"] == 10 and info["digest"] == dataset_digest(images, labels)
    assert manifest.meta == {
        k: info[k] for k in ("num_images", "channels", "resolution", "num_classes", "digest")
    }
    assert sorted(manifest.files) == ["dataset.json", "images.npy", "labels.npy"]


def test_cifar10_tarball_with_resize_flips_and_max_images(local_storage: Storage, tmp_path: Path) -> None:
    tarball = tmp_path / "cifar-10-python.tar.gz"
    data = _cifar_tarball(tarball)
    manifest = run_stage(local_storage, "prepare_data", {"source": "cifar10", "uri": str(tarball)})
    images, labels, info = _load(local_storage, manifest)
    assert np.array_equal(images, data) and list(labels) == [i % 10 for i in range(20)]
    assert info["class_names"][0] == "airplane"
    manifest = run_stage(
        local_storage,
        "prepare_data",
        {"source": "cifar10", "uri": f"file://{tarball}", "resolution": 16, "hflip": True, "max_images": 5},
    )
    images, labels, info = _load(local_storage, manifest)
    assert images.shape == (10, 3, 16, 16) and list(labels) == [0, 1, 2, 3, 4] * 2
    assert np.array_equal(images[5:], images[:5, :, :, ::-1])


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
        local_storage, "prepare_data", {"source": "image-folder", "uri": str(tmp_path / "imgs")}
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
    manifest = run_stage(storage, "prepare_data", {"source": "npz", "uri": uri, "storage_options": options})
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


def test_large_datasets_are_sharded(tmp_path: Path) -> None:
    from cmflow.data.shards import write_dataset

    images = np.random.default_rng(3).integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    info = write_dataset(tmp_path, images, None, source="npz", num_classes=0, shard_bytes=4 * 64)
    assert info["image_files"] == ["images-00000.npy", "images-00001.npy", "images-00002.npy"]
    got, labels, _ = read_dataset(lambda name: (tmp_path / name).read_bytes())
    assert np.array_equal(got, images) and labels is None
    assert json.loads((tmp_path / "dataset.json").read_text())["num_images"] == 10
