"""``cmflow fid stats`` / ``cmflow fid score`` on an .npz and an image folder the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmflow.cli.main import main
from cmflow.metrics.reference import stats_from_bytes


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def files(tmp_path: Path, digits_images: tuple[np.ndarray, np.ndarray]) -> dict[str, Path]:
    images = digits_images[0]
    paths = {
        "npz": tmp_path / "real.npz",
        "half_a": tmp_path / "a.npz",
        "nhwc": tmp_path / "b-nhwc.npz",
        "noise": tmp_path / "noise.npz",
        "folder": tmp_path / "pngs",
    }
    np.savez(paths["npz"], images=images)
    np.savez(paths["half_a"], images[:900])
    np.savez(
        paths["nhwc"], x=images[900:].transpose(0, 2, 3, 1)
    )  # not called "images": the first array is used
    np.savez(paths["noise"], images=np.random.default_rng(0).integers(0, 256, (600, 1, 8, 8), dtype=np.uint8))
    folder = paths["folder"]
    folder.mkdir()
    for i, image in enumerate(images[900:]):
        Image.fromarray(image[0]).save(folder / f"{i:04d}.png")
    return paths


def test_stats_then_score(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ref" / "stats.npz"
    out.parent.mkdir()
    code, text, err = cli(
        capsys, "fid", "stats", str(files["npz"]), "--extractor", "digits", "--out", str(out)
    )
    assert code == 0, err
    assert text.startswith(f"wrote {out}: 1797 images, 64-d digits features")
    ref = stats_from_bytes(out.read_bytes())
    assert ref.n == 1797 and ref.mu.shape == (64,) and ref.meta["extractor"] == "digits"

    code, text, err = cli(capsys, "fid", "score", str(files["npz"]), "--ref", str(out), "--json")
    assert code == 0, err
    same = json.loads(text)
    assert abs(same["fid"]) < 1e-6 and same["num_images"] == same["num_ref"] == 1797

    code, text, _ = cli(capsys, "fid", "score", str(files["half_a"]), "--ref", str(out), "--json")
    half = json.loads(text)["fid"]
    code, text, _ = cli(capsys, "fid", "score", str(files["noise"]), "--ref", str(out), "--json")
    noise = json.loads(text)["fid"]
    assert 0 < half * 20 < noise

    # images against images: an image folder holds the same pictures as the NHWC npz (PNG is lossless)
    code, text, err = cli(capsys, "fid", "score", str(files["folder"]), "--ref", str(files["nhwc"]), "--json")
    assert code == 0, err
    pair = json.loads(text)
    assert abs(pair["fid"]) < 1e-6 and pair["precision"] == 1.0 and pair["recall"] == 1.0 and "kid" in pair
    code, text, _ = cli(capsys, "fid", "score", str(files["folder"]), "--ref", str(files["half_a"]))
    assert (
        code == 0
        and text.startswith("FID ")
        and "precision" in text
        and "897 images vs 900 reference" in text
    )


def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((10, 1, 8, 8), dtype=np.float32))
    stats = tmp_path / "stats.npz"
    assert cli(capsys, "fid", "stats", str(files["npz"]), "--out", str(stats))[0] == 0
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.zeros((10, 3, 16, 16), dtype=np.uint8))
    cases = [
        (["stats", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o.npz")], "does not exist"),
        (["stats", str(corrupt), "--out", str(tmp_path / "o.npz")], "not a readable .npz"),
        (["stats", str(floats), "--out", str(tmp_path / "o.npz")], "float32; store them as uint8"),
        (["score", str(stats), "--ref", str(stats)], "holds reference statistics"),
        (["score", str(files["npz"]), "--ref", str(corrupt)], "not a readable .npz"),
        (["score", str(files["npz"]), "--ref", str(stats), "--extractor", "inception-v3"], "needs --weights"),
        (["score", str(rgb), "--ref", str(stats)], "grey 8x8"),
        (["stats", str(files["npz"]), "--out", str(tmp_path / "o.npz"), "--extractor", "vgg"], "unknown"),
        (
            ["stats", str(files["npz"]), "--out", str(tmp_path / "o.npz"), "--weights", str(corrupt)],
            "cannot load the digits extractor weights",
        ),
    ]
    for args, needle in cases:
        code, out, err = cli(capsys, "fid", *args)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, err)
    assert not (tmp_path / "o.npz").exists()


def test_ref_computed_with_other_weights_is_refused(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path
) -> None:
    from cmflow.metrics.reference import stats_to_bytes

    ref = stats_from_bytes(
        (lambda p: (cli(capsys, "fid", "stats", str(files["npz"]), "--out", str(p)), p)[1])(
            tmp_path / "s.npz"
        ).read_bytes()
    )
    other = tmp_path / "other.npz"
    other.write_bytes(stats_to_bytes(ref.mu, ref.sigma, ref.n, {**ref.meta, "extractor_sha256": "0" * 64}))
    code, _, err = cli(capsys, "fid", "score", str(files["npz"]), "--ref", str(other))
    assert code == 2 and "other digits weights" in err
    plain = tmp_path / "plain.npz"  # a TTUR-style file: mu and sigma only, no provenance
    np.savez(plain, mu=ref.mu, sigma=ref.sigma)
    code, out, err = cli(capsys, "fid", "score", str(files["npz"]), "--ref", str(plain), "--json")
    assert code == 0 and abs(json.loads(out)["fid"]) < 1e-6 and json.loads(out)["num_ref"] == -1
