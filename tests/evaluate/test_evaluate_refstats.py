"""Reference statistics: computed once per (dataset, extractor weights, resolution), then reused from the store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from cmflow.metrics.extractors import load_extractor
from cmflow.metrics.reference import reference_key, stats_from_bytes
from cmflow.stages.refstats import REFERENCE_KIND, get_reference, lookup_reference, reference_cache_key
from cmflow.storage import Storage


def perturbed_digits_weights() -> bytes:
    """The shipped digits net with one weight changed: same architecture, different sha256."""
    from safetensors.torch import save

    from cmflow.metrics.digits_net import load_digits_net

    net, _ = load_digits_net()
    state = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    state["fc_features.bias"][0] += 0.5
    return save(state)


def test_computed_once_then_a_cache_hit(
    storage: Storage, digits_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images = digits_images[0][:300]
    extractor = load_extractor("digits")
    calls: list[int] = []
    progress: list[tuple[int, int]] = []

    def load() -> np.ndarray:
        calls.append(1)
        return images

    first = get_reference(
        storage,
        load,
        dataset_digest="d" * 64,
        extractor=extractor,
        resolution=8,
        batch_size=128,
        on_batch=lambda done, total: progress.append((done, total)),
    )
    second = get_reference(storage, load, dataset_digest="d" * 64, extractor=extractor, resolution=8)
    assert calls == [1]  # the second call never loaded the images
    assert not first.hit and second.hit
    assert second.attempt == first.attempt and second.digest == first.digest
    assert progress[-1] == (300, 300) and len(progress) == 3
    key = reference_key("d" * 64, "digits", 8, extractor_digest=extractor.weights_sha256)
    assert second.key == key and second.cache_key == hashlib.sha256(key.encode()).hexdigest()
    manifest = storage.load_manifest(REFERENCE_KIND, second.cache_key)
    assert manifest is not None and sorted(manifest.files) == ["features.npy", "stats.npz"]
    stored = stats_from_bytes(storage.read_artifact_file(manifest, "stats.npz"))
    assert stored.n == 300 and stored.meta["extractor_sha256"] == extractor.weights_sha256
    np.testing.assert_array_equal(stored.sigma, second.stats.sigma)
    assert second.features.shape == (300, extractor.num_features) and second.features.dtype == np.float32
    # the moments do not depend on the (shuffled) order the images went through the network
    direct = extractor(torch.from_numpy(images)).double().numpy()
    np.testing.assert_allclose(second.stats.mu, direct.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(second.stats.sigma, np.cov(direct, rowvar=False), rtol=1e-5, atol=1e-6)


def test_other_weights_dataset_or_resolution_get_other_keys(
    storage: Storage, digits_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images = digits_images[0][:100]
    shipped = load_extractor("digits")
    other = load_extractor("digits", perturbed_digits_weights())
    assert other.weights_sha256 != shipped.weights_sha256
    a = get_reference(storage, lambda: images, dataset_digest="a" * 64, extractor=shipped, resolution=8)
    b = get_reference(storage, lambda: images, dataset_digest="a" * 64, extractor=other, resolution=8)
    c = get_reference(storage, lambda: images, dataset_digest="b" * 64, extractor=shipped, resolution=8)
    assert not b.hit and not c.hit
    assert len({a.cache_key, b.cache_key, c.cache_key}) == 3
    assert a.digest != b.digest
    assert reference_cache_key(reference_key("a" * 64, "digits", 16, shipped.weights_sha256)) != a.cache_key
    assert lookup_reference(storage, "a" * 64, other, 8).attempt == b.attempt


def test_feature_subset_and_a_corrupt_artifact_is_recomputed(
    storage: Storage, digits_images: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = digits_images
    sorted_images = images[np.argsort(labels, kind="stable")][:400]  # sorted by class, as folders often are
    extractor = load_extractor("digits")
    ref = get_reference(
        storage,
        lambda: sorted_images,
        dataset_digest="s" * 64,
        extractor=extractor,
        resolution=8,
        max_features=100,
    )
    assert ref.stats.n == 400 and ref.features.shape[0] == 100
    # the kept rows are a shuffled subset, not the first 100 (which are all zeros and ones)
    first_rows = extractor(torch.from_numpy(sorted_images[:100])).numpy()
    assert not np.allclose(np.sort(ref.features, axis=0), np.sort(first_rows, axis=0))
    # tamper with the committed stats: the next lookup is a miss and the stats are computed again
    prefix = Storage.artifact_prefix(REFERENCE_KIND, ref.cache_key)
    path = Path(storage.path(f"{prefix}/attempts/{ref.attempt}/stats.npz"))
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    again = get_reference(
        storage,
        lambda: sorted_images,
        dataset_digest="s" * 64,
        extractor=extractor,
        resolution=8,
        max_features=100,
    )
    assert not again.hit and again.attempt != ref.attempt
    assert again.digest == ref.digest  # deterministic bytes: the same statistics again


def test_lookup_of_nothing_is_none(storage: Storage) -> None:
    assert lookup_reference(storage, "z" * 64, load_extractor("digits"), 8) is None
