"""Foundation fixtures: one storage object per backend (a local folder, and the moto S3 server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmflow.storage import Storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    root, options = request.getfixturevalue("s3_root")
    return Storage(root, options)
