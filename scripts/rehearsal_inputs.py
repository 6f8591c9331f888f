"""The inputs of the CIFAR-10 rehearsal (pipelines/cifar10-rehearsal.yaml), in the real files' formats.

    python scripts/rehearsal_inputs.py BASE [--per-batch 10000] [--seed 0]     # a path or an s3:// URI

writes

* ``BASE/cifar10/cifar-10-python.tar.gz``: a CIFAR-10-shaped dataset in the real python-tarball format --
  ``cifar-10-batches-py/data_batch_1..5`` (``--per-batch`` images each: 50 000 by default), ``test_batch``,
  ``batches.meta`` and ``readme.html``, pickled (protocol 2) and gzipped as the published tarball is, so
  ``prepare_data``'s real loader (restricted unpickler, member checks) reads it. The images are procedural,
  not noise: each of the ten classes is a coloured shape (disc, square, ring, stripes, ...) at a random
  position, scale and hue on a smooth background, so a model has something to learn;
* ``BASE/fid/pt_inception-2015-12-05-6726825d.pth``: Inception-v3 in the standard FID weights layout with
  random weights that keep activations O(1) (the real file cannot be downloaded here), so the evaluation
  runs the real extractor at its real cost; its FIDs mean nothing.

An ``s3://`` BASE is written through s3fs (``AWS_ENDPOINT_URL`` for a local endpoint).
"""

from __future__ import annotations

import argparse
import io
import pickle
import tarfile

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def images_for(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 3, 32, 32) pictures of the classes in ``labels``."""
    n = labels.shape[0]
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31.0
    cx, cy = rng.uniform(0.3, 0.7, (2, n, 1, 1)).astype(np.float32)
    r = rng.uniform(0.12, 0.3, (n, 1, 1)).astype(np.float32)
    dx, dy = xx[None] - cx, yy[None] - cy
    dist = np.sqrt(dx**2 + dy**2)
    shapes = np.stack(
        [
            dist < r,  # disc
            (np.abs(dx) < r) & (np.abs(dy) < r),  # square
            (dist < r) & (dist > r * 0.6),  # ring
            np.sin(xx[None] * 30 * r) > 0,  # vertical stripes
            np.sin(yy[None] * 30 * r) > 0,  # horizontal stripes
            np.abs(dx) + np.abs(dy) < r,  # diamond
            (np.abs(dx) < r * 0.3) | (np.abs(dy) < r * 0.3),  # cross
            dy > dx,  # diagonal split
            np.sin((xx[None] + yy[None]) * 25 * r) > 0,  # diagonal stripes
            (dist < r) & (dx > 0),  # half disc
        ]
    )[labels, np.arange(n)].astype(np.float32)  # (N, 32, 32)
    hue = (labels[:, None] / 10.0 + rng.normal(0, 0.03, (n, 1))) % 1.0
    colour = np.concatenate([np.abs(np.sin(np.pi * (hue + k / 3))) for k in range(3)], axis=1)  # (N, 3)
    background = rng.uniform(0.1, 0.6, (n, 3, 1, 1)) * (0.6 + 0.4 * yy[None, None])
    pictures = background * (1 - shapes[:, None]) + colour[:, :, None, None] * shapes[:, None]
    pictures += rng.normal(0, 0.03, pictures.shape)
    return np.clip(pictures * 255, 0, 255).round().astype(np.uint8)


def batch(name: str, labels: np.ndarray, rng: np.random.Generator) -> bytes:
    data = images_for(labels, rng).reshape(labels.shape[0], 3072)
    content = {
        b"batch_label": name.encode(),
        b"labels": [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"synthetic_{i:06d}.png".encode() for i in range(labels.shape[0])],
    }
    return pickle.dumps(content, protocol=2)


def tarball(per_batch: int = 10_000, seed: int = 0) -> bytes:
    """The gzipped tarball's bytes."""
    rng = np.random.default_rng(seed)
    members = []
    for index in range(1, 6):
        labels = rng.integers(0, 10, per_batch)
        members.append((f"data_batch_{index}", batch(f"training batch {index} of 5", labels, rng)))
    members.append(
        ("test_batch", batch("testing batch 1 of 1", rng.integers(0, 10, per_batch // 5 or 1), rng))
    )
    meta = {
        b"label_names": [c.encode() for c in CLASSES],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    members.append(("batches.meta", pickle.dumps(meta, protocol=2)))
    members.append(("readme.html", b"<html>synthetic CIFAR-10-shaped data written by cmflow</html>\n"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, blob in members:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def inception_weights(seed: int = 0) -> bytes:
    """A state dict in the standard FID Inception-v3 layout with random weights giving O(1) activations."""
    import torch

    from cmflow.metrics.inception import build_fid_inception

    model, generator = build_fid_inception(), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
                )
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


TARBALL = "cifar10/cifar-10-python.tar.gz"
INCEPTION = "fid/pt_inception-2015-12-05-6726825d.pth"


def write_inputs(
    base: str, per_batch: int = 10_000, seed: int = 0, options: dict | None = None
) -> dict[str, str]:
    """Write both inputs under ``base``; returns their URIs."""
    import fsspec

    uris = {"tarball": f"{base.rstrip('/')}/{TARBALL}", "inception": f"{base.rstrip('/')}/{INCEPTION}"}
    for key, data in (("tarball", tarball(per_batch, seed)), ("inception", inception_weights(seed))):
        with fsspec.open(uris[key], "wb", **(options or {})) as handle:
            handle.write(data)
    return uris


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="where to write the inputs: a folder path or an s3:// URI")
    parser.add_argument("--per-batch", type=int, default=10_000, help="images per training batch (5 batches)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    uris = write_inputs(args.base, args.per_batch, args.seed)
    print(
        f"wrote {5 * args.per_batch} training images to {uris['tarball']} and FID weights to {uris['inception']}"
    )


if __name__ == "__main__":
    main()
