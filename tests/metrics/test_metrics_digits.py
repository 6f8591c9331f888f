"""The shipped digits feature network: integrity, accuracy, covariance health and FID sanity."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_digits_net import accuracy, add_noise, box_blur, load_digits_split

import cmflow.metrics.digits_net as digits_net
from cmflow.metrics.digits_net import (
    DIGITS_WEIGHTS_FILE,
    DIGITS_WEIGHTS_META,
    load_digits_net,
    shipped_digits_meta,
)
from cmflow.metrics.extractors import DigitsExtractor, compute_stats, load_extractor
from cmflow.metrics.stats import FeatureStats, fid_from_stats

WEIGHTS_DIR = Path(digits_net.__file__).parent / "weights"


@pytest.fixture(scope="module")
def split() -> dict[str, np.ndarray]:
    return load_digits_split(shipped_digits_meta()["split"]["seed"])


@pytest.fixture(scope="module")
def extractor() -> DigitsExtractor:
    ext = load_extractor("digits")
    assert isinstance(ext, DigitsExtractor)
    return ext


def moments(extractor: DigitsExtractor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return compute_stats(extractor, images).to_moments()


def test_shipped_weights_match_recorded_sha256(extractor: DigitsExtractor) -> None:
    meta = shipped_digits_meta()
    data = (WEIGHTS_DIR / DIGITS_WEIGHTS_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == meta["sha256"]
    assert extractor.weights_sha256 == meta["sha256"]
    assert extractor.num_features == meta["feature_dim"] == 64


def test_corrupt_shipped_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(WEIGHTS_DIR / DIGITS_WEIGHTS_META, tmp_path / DIGITS_WEIGHTS_META)
    data = bytearray((WEIGHTS_DIR / DIGITS_WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF  # flip bits of one weight
    (tmp_path / DIGITS_WEIGHTS_FILE).write_bytes(bytes(data))
    monkeypatch.setattr(digits_net, "_weights_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match="corrupt"):
        load_digits_net()
    # explicit weights are not checked against the shipped record, but their sha256 is reported
    _, sha = load_digits_net(bytes(data))
    assert sha == hashlib.sha256(bytes(data)).hexdigest()


def test_held_out_accuracy_matches_the_record(split: dict[str, np.ndarray]) -> None:
    meta = shipped_digits_meta()
    net, _ = load_digits_net()
    acc, correct = accuracy(net, split["test_images"], split["test_labels"])
    assert correct == meta["held_out_correct"]
    assert acc == pytest.approx(meta["held_out_accuracy"], abs=1e-12)
    assert acc >= 0.97


def test_features_have_no_dead_units_and_a_well_conditioned_covariance(
    extractor: DigitsExtractor, split: dict[str, np.ndarray]
) -> None:
    _, sigma = moments(extractor, split["all_images"])
    var = np.diag(sigma)
    assert np.all(var > 1e-6 * np.median(var))
    eig = np.linalg.eigvalsh(sigma)
    assert eig[0] > 0 and eig[-1] / eig[0] < 1e6


def test_fid_separates_held_out_real_from_noise_and_blur(
    extractor: DigitsExtractor, split: dict[str, np.ndarray]
) -> None:
    rng = np.random.default_rng(0)
    ref = moments(extractor, split["train_images"])
    test = split["test_images"]
    fid_real = fid_from_stats(*ref, *moments(extractor, test))
    fid_blur = fid_from_stats(*ref, *moments(extractor, box_blur(test)))
    fid_noise = fid_from_stats(*ref, *moments(extractor, rng.integers(0, 256, test.shape, dtype=np.uint8)))
    fid_gauss = fid_from_stats(*ref, *moments(extractor, add_noise(test, 0.2, rng)))
    assert fid_real < 15.0
    assert fid_blur > 20 * fid_real and fid_noise > 20 * fid_real
    assert fid_gauss > 3 * fid_real  # mild corruption, same 360 images: still clearly worse
    assert fid_real == pytest.approx(shipped_digits_meta()["fid_sanity"]["train_vs_heldout"], rel=1e-4)


def test_extractor_input_contract(extractor: DigitsExtractor) -> None:
    x = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    out = extractor(x)
    assert out.shape == (3, 64) and out.dtype == torch.float32
    with pytest.raises(TypeError, match="uint8"):
        extractor(x.float())
    with pytest.raises(ValueError, match="8x8"):
        extractor(torch.zeros(3, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="8x8"):
        extractor(torch.zeros(3, 3, 8, 8, dtype=torch.uint8))


def test_compute_stats_streams_arrays_and_iterables_alike(
    extractor: DigitsExtractor, split: dict[str, np.ndarray]
) -> None:
    images = split["all_images"]
    seen: list[int] = []
    whole = compute_stats(extractor, images, batch_size=500, on_batch=seen.append, keep_features=100)
    assert seen == [500, 500, 500, 297]
    assert whole.n == len(images) and whole.features.shape == (100, 64)
    chunks = (images[i : i + 333] for i in range(0, len(images), 333))
    streamed = compute_stats(extractor, chunks, batch_size=200)
    direct = FeatureStats()
    direct.update(extractor(torch.from_numpy(images)))
    for s in (whole, streamed):
        np.testing.assert_allclose(s.mean(), direct.mean(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s.cov(), direct.cov(), rtol=1e-5, atol=1e-5)
    # (N, H, W) grey arrays are accepted too
    assert compute_stats(extractor, images[:10, 0]).n == 10
