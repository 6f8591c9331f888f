"""Train the digits FID feature network and write its weights + JSON record.

    python scripts/train_digits_net.py --out cmflow/metrics/weights

Data: sklearn's bundled 8x8 digits (1797 images, no download), converted with ``digits_to_uint8``, split
stratified into 1437 train / 360 held-out with ``--split-seed``. Training: AdamW + cosine decay, +-1 pixel
random shifts, fixed seed, CPU. Writes ``digits_features.safetensors`` and ``digits_features.json`` (sha256,
held-out accuracy, split, training recipe, feature-covariance health and FID sanity numbers, date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors

from cmflow.metrics.digits_net import (
    DIGITS_WEIGHTS_FILE,
    DIGITS_WEIGHTS_META,
    DigitsNet,
    digits_to_uint8,
    load_digits_net,
    uint8_to_input,
)
from cmflow.metrics.stats import FeatureStats, fid_from_stats

TEST_SIZE = 360


def load_digits_split(split_seed: int = 0) -> dict[str, np.ndarray]:
    """sklearn digits as uint8 (N, 1, 8, 8) plus labels, split stratified into train / held-out test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = digits_to_uint8(data.images)
    labels = data.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_SIZE, stratify=labels, random_state=split_seed
    )
    return {
        "all_images": images,
        "train_images": images[idx_train],
        "train_labels": labels[idx_train],
        "test_images": images[idx_test],
        "test_labels": labels[idx_test],
    }


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to +-max_shift pixels in x and y, zero-filling (x: (B, 1, H, W) in [0, 1])."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    oy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


class _ReluControlNet(DigitsNet):
    """Control for the measurement only (never shipped): ReLU everywhere and ReLU'd features, as in the
    prototype whose covariance was singular."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.fc_features(F.max_pool2d(h, 2).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    feature_dim: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    net_class: type[DigitsNet] = DigitsNet,
) -> DigitsNet:
    """Train :class:`DigitsNet` on uint8 images; returns it in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = net_class(feature_dim=feature_dim)
    x_all = torch.from_numpy(train_images).float() / 255.0  # (N, 1, 8, 8) in [0, 1]
    y_all = torch.from_numpy(train_labels)
    steps_per_epoch = -(-len(y_all) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_all), generator=gen)
        for start in range(0, len(y_all), batch_size):
            idx = perm[start : start + batch_size]
            x = random_shift(x_all[idx], gen) * 2.0 - 1.0
            loss = F.cross_entropy(net(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.inference_mode()
def accuracy(net: DigitsNet, images: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(accuracy, number correct) of ``net`` on uint8 images."""
    pred = net(uint8_to_input(torch.from_numpy(images))).argmax(1).numpy()
    correct = int((pred == labels).sum())
    return correct / len(labels), correct


@torch.inference_mode()
def features(net: DigitsNet, images: np.ndarray) -> np.ndarray:
    return net.features(uint8_to_input(torch.from_numpy(images))).double().numpy()


def covariance_health(feats: np.ndarray) -> dict[str, Any]:
    """Near-constant feature dims and the condition number of the covariance of ``feats`` (N, D)."""
    stats = FeatureStats()
    stats.update(feats)
    cov = stats.cov()
    var = np.diag(cov)
    eig = np.linalg.eigvalsh(cov)
    return {
        "num_dims": int(feats.shape[1]),
        "dims_var_below_1e-6_of_median": int((var < 1e-6 * np.median(var)).sum()),
        "dims_always_zero": int(np.all(feats == 0, axis=0).sum()),
        "cov_eig_min": float(eig[0]),
        "cov_eig_max": float(eig[-1]),
        "cov_condition_number": float(eig[-1] / eig[0]) if eig[0] > 0 else None,  # None: singular
    }


def box_blur(images: np.ndarray) -> np.ndarray:
    """3x3 box blur of uint8 (N, 1, H, W) images (borders averaged over the pixels inside)."""
    x = torch.from_numpy(images).float()
    y = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def add_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of std ``sigma`` in [0, 1] image units, requantised to uint8."""
    x = images / 255.0 + rng.normal(0.0, sigma, images.shape)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def fid_sanity(net: DigitsNet, split: dict[str, np.ndarray], seed: int = 0) -> dict[str, float]:
    """FID of the train split against held-out / perturbed held-out / noise images (same n = 360)."""
    rng = np.random.default_rng(seed)
    test = split["test_images"]

    def moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = FeatureStats()
        s.update(features(net, images))
        return s.to_moments()

    ref = moments(split["train_images"])
    cases = {
        "train_vs_heldout": test,
        "train_vs_heldout_noise_0.1": add_noise(test, 0.1, rng),
        "train_vs_heldout_noise_0.2": add_noise(test, 0.2, rng),
        "train_vs_heldout_blur3x3": box_blur(test),
        "train_vs_uniform_noise": rng.integers(0, 256, test.shape, dtype=np.uint8),
    }
    out = {name: fid_from_stats(*ref, *moments(images)) for name, images in cases.items()}
    all_images = split["all_images"]
    perm = rng.permutation(len(all_images))
    half = len(all_images) // 2
    out["half_vs_half_all_898"] = fid_from_stats(
        *moments(all_images[perm[:half]]), *moments(all_images[perm[half : 2 * half]])
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (cmflow/metrics/weights)")
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0, help="init / shuffling / augmentation seed")
    parser.add_argument("--split-seed", type=int, default=0, help="train/held-out split seed")
    parser.add_argument(
        "--no-relu-control", action="store_true", help="skip training the ReLU control net (measurement only)"
    )
    args = parser.parse_args(argv)

    split = load_digits_split(args.split_seed)
    t0 = time.perf_counter()
    net = train(
        split["train_images"],
        split["train_labels"],
        args.feature_dim,
        args.epochs,
        args.batch_size,
        args.lr,
        args.weight_decay,
        args.seed,
    )
    train_s = time.perf_counter() - t0

    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    # one metadata key only: safetensors writes a multi-key map in random order, which changes the sha256
    blob = save_safetensors(state, metadata={"cmflow": f"DigitsNet feature_dim={args.feature_dim}"})
    sha = hashlib.sha256(blob).hexdigest()
    net, _ = load_digits_net(blob)  # measure exactly what ships
    acc, correct = accuracy(net, split["test_images"], split["test_labels"])
    train_acc, _ = accuracy(net, split["train_images"], split["train_labels"])
    real_feats = features(net, split["all_images"])
    health: dict[str, Any] = {"shipped_pre_activation": covariance_health(real_feats)}
    if not args.no_relu_control:
        control = train(
            split["train_images"],
            split["train_labels"],
            args.feature_dim,
            args.epochs,
            args.batch_size,
            args.lr,
            args.weight_decay,
            args.seed,
            net_class=_ReluControlNet,
        )
        health["control_relu_net_same_recipe_not_shipped"] = {
            "held_out_accuracy": accuracy(control, split["test_images"], split["test_labels"])[0],
            **covariance_health(features(control, split["all_images"])),
        }
    record = {
        "file": DIGITS_WEIGHTS_FILE,
        "sha256": sha,
        "feature_dim": args.feature_dim,
        "feature_layer": "fc_features pre-activation (affine map of the 1024-d SiLU conv features)",
        "architecture": "conv3x3(1->32)+SiLU, conv3x3(32->64)+SiLU, maxpool2, linear(1024->D)=features, "
        "SiLU, linear(D->10)",
        "input": "uint8 (B,1,8,8); sklearn digits 0..16 -> round(v*255/16); net input = x/127.5 - 1",
        "held_out_accuracy": acc,
        "held_out_correct": correct,
        "held_out_size": len(split["test_labels"]),
        "train_accuracy": train_acc,
        "split": {
            "dataset": "sklearn.datasets.load_digits",
            "seed": args.split_seed,
            "test_size": TEST_SIZE,
            "stratified": True,
            "function": "cmflow.metrics.train_digits_net.load_digits_split",
        },
        "training": {
            "optimizer": "AdamW",
            "lr": args.lr,
            "schedule": "OneCycleLR (cosine)",
            "weight_decay": args.weight_decay,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "augmentation": "random +-1 pixel shifts",
            "seed": args.seed,
            "wall_s": round(train_s, 1),
            "torch": torch.__version__,
            "num_threads": torch.get_num_threads(),
            "command": "python scripts/train_digits_net.py --out cmflow/metrics/weights",
        },
        "real_feature_covariance_all_1797": health,
        "fid_sanity": fid_sanity(net, split),
        "created": dt.date.today().isoformat(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / DIGITS_WEIGHTS_FILE).write_bytes(blob)
    (args.out / DIGITS_WEIGHTS_META).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
