"""Per-seed results of a sampled teacher, kept in the store and reused by later evaluations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TEACHER_RESULTS_KIND = "fid_teacher"


@dataclass
class SeedCache:
    """Per-seed results of one sampled teacher, kept in the store as write-once ``fid_teacher`` artifacts.

    The teacher is by far the most expensive setting (NFE 35) and does not change when only the student
    does, so its per-seed numbers are keyed by everything they depend on -- the teacher's digest, the seed,
    sample count, sampler, extractor weights, reference digest, metric settings and the stage's code
    fingerprint -- and reused by any later evaluation of the same teacher.
    """

    storage: Any
    components: dict[str, Any]
    producer: dict[str, Any]

    def key(self, seed: int) -> str:
        from cmflow.storage import canonical_json, sha256_bytes

        return sha256_bytes(canonical_json({**self.components, "seed": seed}).encode())

    def get(self, seed: int) -> tuple[dict[str, Any], Any] | None:
        import io

        import numpy as np

        from cmflow.cache import lookup

        found = lookup(self.storage, TEACHER_RESULTS_KIND, self.key(seed))
        if not found.hit:
            return None
        row = json.loads(self.storage.read_artifact_file(found.manifest, "measure.json"))
        grid = np.load(
            io.BytesIO(self.storage.read_artifact_file(found.manifest, "grid.npy")), allow_pickle=False
        )
        return row, grid

    def put(self, seed: int, row: dict[str, Any], grid: Any) -> None:
        import tempfile
        from pathlib import Path

        import numpy as np

        with tempfile.TemporaryDirectory(prefix="cmflow-fid-teacher-") as tmp:
            folder = Path(tmp)
            (folder / "measure.json").write_text(json.dumps(row, sort_keys=True, allow_nan=False))
            np.save(folder / "grid.npy", grid, allow_pickle=False)
            self.storage.commit(
                TEACHER_RESULTS_KIND,
                self.key(seed),
                folder,
                meta={"seed": seed, "fid": row["fid"]},
                key_components={**self.components, "seed": seed},
                producer=self.producer,
            )
