"""Reference statistics: measured once per (dataset, extractor weights, resolution) over slices of the dataset,
merged, committed, then reused from the store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cmflow.metrics.extractors import load_extractor
from cmflow.metrics.reference import reference_key, stats_from_bytes
from cmflow.stage import Artifact, StageContext
from cmflow.stages.evaluate.params import EvaluateParams
from cmflow.stages.evaluate.stage import _extractor, _reference
from cmflow.stages.refstats import REFERENCE_KIND, kept_rows, lookup_reference, reference_cache_key
from cmflow.storage import Storage


def perturbed_digits_weights() -> bytes:
    """The shipped digits net with one weight changed: same architecture, different sha256."""
    from safetensors.torch import save

    from cmflow.metrics.digits_net import load_digits_net

    net, _ = load_digits_net()
    state = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    state["fc_features.bias"][0] += 0.5
    return save(state)


def reference(data: Artifact, ctx: StageContext, **params: object):  # noqa: ANN201
    from cmflow.data.shards import DatasetInfo

    chosen = EvaluateParams(**params)  # type: ignore[arg-type]
    info = DatasetInfo.parse(data.read_bytes("dataset.json"))
    extractor_ref, extractor = _extractor(chosen, ctx)
    return _reference(chosen, data, info, extractor_ref, extractor, ctx), extractor


def test_computed_once_then_a_cache_hit(
    storage: Storage,
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
) -> None:
    images = digits_images[0][:300]
    data = make_dataset(images)
    ctx = make_ctx()
    first, extractor = reference(data, ctx)
    second, _ = reference(data, make_ctx())
    assert not first.hit and second.hit
    assert second.attempt == first.attempt and second.digest == first.digest
    assert any("reference statistics" in u.get("message", "") for u in ctx.updates)  # type: ignore[attr-defined]
    key = reference_key(data.meta["digest"], "digits", 8, extractor_digest=extractor.weights_sha256)
    assert second.key == key and second.cache_key == hashlib.sha256(key.encode()).hexdigest()
    manifest = storage.load_manifest(REFERENCE_KIND, second.cache_key)
    assert manifest is not None and sorted(manifest.files) == ["features.npy", "stats.npz"]
    stored = stats_from_bytes(storage.read_artifact_file(manifest, "stats.npz"))
    assert stored.n == 300 and stored.meta["extractor_sha256"] == extractor.weights_sha256
    np.testing.assert_array_equal(stored.sigma, second.stats.sigma)
    assert second.features.shape == (300, extractor.num_features) and second.features.dtype == np.float32
    direct = extractor(torch.from_numpy(images)).double().numpy()
    np.testing.assert_allclose(second.stats.mu, direct.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(second.stats.sigma, np.cov(direct, rowvar=False), rtol=1e-5, atol=1e-6)


def test_the_reference_does_not_depend_on_the_number_of_tasks(
    tmp_path: Path,
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
) -> None:
    data = make_dataset(digits_images[0][:500])
    found = []
    for num_tasks in (1, 3, 4):
        store = Storage(str(tmp_path / f"store-{num_tasks}"))  # a fresh store: computed, not reused
        ref, _ = reference(data, make_ctx(storage_override=store), num_tasks=num_tasks)
        assert not ref.hit
        found.append(ref)
    for other in found[1:]:
        np.testing.assert_allclose(other.stats.mu, found[0].stats.mu, rtol=1e-12, atol=0)
        np.testing.assert_allclose(other.stats.sigma, found[0].stats.sigma, rtol=1e-10, atol=1e-14)
        np.testing.assert_array_equal(other.features, found[0].features)


def test_other_weights_dataset_resolution_or_image_count_get_other_keys(
    storage: Storage,
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
    tmp_path: Path,
) -> None:
    images = digits_images[0][:100]
    weights = tmp_path / "other.safetensors"
    weights.write_bytes(perturbed_digits_weights())
    data, other_data = make_dataset(images), make_dataset(images[::-1].copy(), name="reversed")
    a, shipped = reference(data, make_ctx())
    b, other = reference(data, make_ctx(), weights_uri=str(weights))
    c, _ = reference(other_data, make_ctx())
    d, _ = reference(data, make_ctx(), reference_images=50)
    assert other.weights_sha256 != shipped.weights_sha256
    assert not b.hit and not c.hit and not d.hit and d.stats.n == 50
    assert len({a.cache_key, b.cache_key, c.cache_key, d.cache_key}) == 4
    assert a.digest != b.digest
    assert (
        reference_cache_key(reference_key(data.meta["digest"], "digits", 16, shipped.weights_sha256))
        != a.cache_key
    )
    assert lookup_reference(storage, data.meta["digest"], other, 8).attempt == b.attempt


def test_kept_rows_are_a_fixed_random_subset() -> None:
    rows = kept_rows(400, max_features=100)
    assert rows.shape == (100,) and np.all(np.diff(rows) > 0) and rows.max() < 400
    assert not np.array_equal(rows, np.arange(100))  # not the first rows (a class-sorted dataset's zeros)
    np.testing.assert_array_equal(rows, kept_rows(400, max_features=100))  # fixed
    np.testing.assert_array_equal(kept_rows(50, max_features=100), np.arange(50))  # all, when few


def test_a_corrupt_reference_is_recomputed(
    storage: Storage,
    digits_images: tuple[np.ndarray, np.ndarray],
    make_dataset: Callable[..., Artifact],
    make_ctx: Callable[..., StageContext],
) -> None:
    data = make_dataset(digits_images[0][:200])
    ref, _ = reference(data, make_ctx())
    prefix = Storage.artifact_prefix(REFERENCE_KIND, ref.cache_key)
    path = Path(storage.path(f"{prefix}/attempts/{ref.attempt}/stats.npz"))
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    again, _ = reference(data, make_ctx())
    assert not again.hit and again.attempt != ref.attempt
    assert again.digest == ref.digest  # deterministic bytes: the same statistics again


@pytest.mark.parametrize("digest", ["z" * 64])
def test_lookup_of_nothing_is_none(storage: Storage, digest: str) -> None:
    assert lookup_reference(storage, digest, load_extractor("digits"), 8) is None
