"""The stage table: stage kind -> :class:`cmflow.stage.StageDef`, written out explicitly.

Stage modules import torch and other heavy libraries inside their functions, so importing this table
(for spec validation or ``cmflow --help``) stays cheap.
"""

from __future__ import annotations

from cmflow.stage import StageDef
from cmflow.stages import demo

STAGES: dict[str, StageDef] = {
    fn.stage_def.kind: fn.stage_def  # type: ignore[attr-defined]
    for fn in (
        demo.arrays,
        demo.reduce,
    )
}
