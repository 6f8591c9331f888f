"""The extractor table, the interface, and the import hygiene of cmflow.metrics."""

from __future__ import annotations

import subprocess
import sys

import torch

import cmflow.metrics as metrics
from cmflow.metrics.extractors import EXTRACTORS, FeatureExtractor, load_extractor


def test_table_names_and_protocol() -> None:
    assert set(EXTRACTORS) == {"digits", "inception-v3"}
    ext = load_extractor("digits", device="cpu")
    assert isinstance(ext, FeatureExtractor)
    assert ext.name == "digits" and ext.to("cpu") is ext
    assert ext(torch.zeros(1, 1, 8, 8, dtype=torch.uint8)).shape == (1, ext.num_features)


def test_package_exports() -> None:
    assert metrics.load_extractor is load_extractor
    assert callable(metrics.fid_from_stats) and callable(metrics.compute_stats)


def test_metrics_import_no_pipeline_dependencies() -> None:
    code = (
        "import sys, cmflow.metrics, cmflow.metrics.extractors\n"
        "bad = {'ray', 'mlflow', 'fsspec', 'pydantic', 'torchvision', 'sklearn'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
