"""The stage table: stage kind -> :class:`cmflow.stage.StageDef`, written out explicitly.

Stage modules import torch and other heavy libraries inside their functions, so importing this table
(for spec validation or ``cmflow --help``) stays cheap.
"""

from __future__ import annotations

from cmflow.stage import StageDef
from cmflow.stages import demo, distill, import_model, perceptual, prepare_data, teacher
from cmflow.stages import register as register_stages
from cmflow.stages.evaluate import stage as evaluate_stage

STAGES: dict[str, StageDef] = {
    fn.stage_def.kind: fn.stage_def  # type: ignore[attr-defined]
    for fn in (
        demo.arrays,
        demo.reduce,
        prepare_data.prepare_data,
        teacher.teacher,
        teacher.teacher_sample,
        distill.distill,
        distill.train_cm,
        perceptual.perceptual_net,
        import_model.import_model,
        evaluate_stage.evaluate,
        register_stages.register,
        register_stages.promote,
    )
}

#: Kinds that need no compute: they only talk to the model registry. The driver runs them in its own
#: process, so a run whose other stages are all cache hits never starts Ray (a cached digits rerun was
#: 8-9 s, most of it Ray starting for ``promote``).
IN_DRIVER: frozenset[str] = frozenset({"register", "promote"})
