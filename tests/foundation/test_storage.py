"""Write-once artifacts and the verified cache, on a local folder and on a real S3 endpoint (moto)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from cmflow import cache
from cmflow.errors import InputError, StorageError, TransientError
from cmflow.storage import Manifest, Storage, check_relpath


def make_output(tmp_path: Path, name: str, payload: bytes) -> Path:
    out = tmp_path / name
    (out / "sub").mkdir(parents=True)
    (out / "data.bin").write_bytes(payload)
    (out / "sub" / "info.json").write_text('{"ok": true}')
    return out


def test_commit_and_read_back(storage: Storage, tmp_path: Path) -> None:
    manifest = storage.commit(
        "demo.kind",
        "ab" * 32,
        make_output(tmp_path, "o", b"x" * 1000),
        meta={"n": 1},
        producer={"run_id": "r1", "stage": "s"},
    )
    assert set(manifest.files) == {"data.bin", "sub/info.json"}
    assert manifest.files["data.bin"]["size"] == 1000
    loaded = storage.load_manifest("demo.kind", "ab" * 32)
    assert loaded is not None and loaded.digest == manifest.digest and loaded.meta == {"n": 1}
    assert storage.read_artifact_file(loaded, "data.bin") == b"x" * 1000
    assert (
        storage.local_artifact_file(loaded, "sub/info.json", tmp_path / "cache").read_text() == '{"ok": true}'
    )
    assert cache.lookup(storage, "demo.kind", "ab" * 32).hit
    with pytest.raises(InputError, match="has no file 'nope'"):
        storage.read_artifact_file(loaded, "nope")


def test_manifest_is_create_only(storage: Storage) -> None:
    storage.write_bytes("x/marker", b"1", create_only=True)
    with pytest.raises(FileExistsError):
        storage.write_bytes("x/marker", b"2", create_only=True)
    assert storage.read_bytes("x/marker") == b"1"


def test_racing_writers_share_one_manifest(storage: Storage, tmp_path: Path) -> None:
    """Two writers (independent Storage objects, as in two processes) commit the same key at once."""
    key = "cd" * 32
    outs = [make_output(tmp_path, f"w{i}", b"same bytes") for i in range(2)]
    results: list[Manifest] = []
    barrier = threading.Barrier(2)

    def writer(i: int) -> None:
        mine = Storage(storage.root, storage.options)
        barrier.wait()
        results.append(mine.commit("demo.kind", key, outs[i]))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert results[0].attempt == results[1].attempt  # both see the winner
    attempts = storage.list(f"{Storage.artifact_prefix('demo.kind', key)}/attempts")
    assert attempts == [results[0].attempt]  # the loser removed its own attempt


@pytest.mark.parametrize("damage", ["delete", "tamper", "manifest"])
def test_damaged_artifact_is_a_miss_then_recommitted(storage: Storage, tmp_path: Path, damage: str) -> None:
    key = "ef" * 32
    manifest = storage.commit("demo.kind", key, make_output(tmp_path, "o", b"abcdef"))
    file_key = f"{Storage.artifact_prefix('demo.kind', key)}/attempts/{manifest.attempt}/data.bin"
    manifest_key = f"{Storage.artifact_prefix('demo.kind', key)}/manifest.json"
    if damage == "delete":
        storage.delete(file_key)
    elif damage == "tamper":
        storage.write_bytes(file_key, b"abcdeX")  # same size, other bytes
    else:
        data = json.loads(storage.read_bytes(manifest_key))
        data["files"]["data.bin"]["size"] = 7
        storage.write_bytes(manifest_key, json.dumps(data).encode())
    found = cache.lookup(storage, "demo.kind", key)
    assert not found.hit and found.reason
    assert not storage.exists(manifest_key)  # moved aside so a recompute can commit
    again = storage.commit("demo.kind", key, make_output(tmp_path, "o2", b"abcdef"))
    assert cache.lookup(storage, "demo.kind", key).hit and again.attempt != manifest.attempt


def test_tampered_read_is_refused(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    manifest = storage.commit("demo.kind", "12" * 32, make_output(tmp_path, "o", b"abcdef"))
    storage.write_bytes(
        f"{Storage.artifact_prefix('demo.kind', '12' * 32)}/attempts/{manifest.attempt}/data.bin", b"zzzzzz"
    )
    with pytest.raises(StorageError, match="does not match its sha256"):
        storage.read_artifact_file(manifest, "data.bin")


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "a\\b", "", "a/./b", "we ird"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(InputError):
        check_relpath(name)


def test_storage_pickles_without_its_filesystem(tmp_path: Path) -> None:
    import pickle

    storage = Storage(str(tmp_path))
    storage.write_bytes("a", b"1")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone._fs is None and clone.read_bytes("a") == b"1"


def test_unreachable_endpoint_is_a_transient_error() -> None:
    options = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    storage = Storage("s3://nobucket/x", options, retries=1)
    with pytest.raises(TransientError, match="after 2 tries"):
        storage.read_bytes("a")
