"""The ``evaluate`` stage: FID, KID and precision/recall of the teacher and the CM at 1 and 2 steps.

``params`` (the stage's params), ``work`` (what one Ray task measures and how results merge), ``teacher_cache``
(per-seed teacher results kept in the store), ``report`` (summaries, ratios, the FID-vs-NFE figure) and
``stage`` (the stage function). This package file imports nothing, so a stage's code fingerprint holds only
the modules it uses.
"""
