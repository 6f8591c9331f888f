"""The engine: runs a validated pipeline on Ray, stage by stage, through the cache and the run record."""

from cmflow.engine.driver import PlanRow, load_output, plan, run_pipeline, storage_for
from cmflow.engine.records import RunRecord, StageRecord, list_runs

__all__ = [
    "PlanRow",
    "RunRecord",
    "StageRecord",
    "list_runs",
    "load_output",
    "plan",
    "run_pipeline",
    "storage_for",
]
