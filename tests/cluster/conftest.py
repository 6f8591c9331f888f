"""Fixtures for the cluster tests."""

from __future__ import annotations

import pytest
from cluster_helpers import FakeSubmitter


@pytest.fixture()
def fake() -> FakeSubmitter:
    return FakeSubmitter()
