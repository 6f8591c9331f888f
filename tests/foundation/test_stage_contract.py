"""One contract suite for every registered stage kind (the diffusers SchedulerCommonTest idea)."""

from __future__ import annotations

import inspect

import pytest
from pydantic import BaseModel

from cmflow.stages.table import STAGES


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_stage_contract(kind: str) -> None:
    definition = STAGES[kind]
    assert definition.kind == kind
    assert issubclass(definition.params_model, BaseModel)
    assert definition.params_model.model_config.get("extra") == "forbid", "params must refuse unknown fields"
    assert definition.version and definition.description, "a stage needs a version and a docstring"
    params = list(inspect.signature(definition.fn).parameters)
    assert params == ["params", "inputs", "ctx"], f"{kind}: signature must be (params, inputs, ctx)"
    for name in definition.cache_ignore:
        assert name in definition.params_model.model_fields, f"{kind}: cache_ignore names unknown {name!r}"
    assert not set(definition.inputs) & set(definition.optional_inputs)
    code = definition.code_fingerprint()
    assert definition.fn.__module__ in code["modules"] and set(code["versions"]) == {"torch", "numpy"}
    for module in code["modules"]:  # every module of the closure exists and imports
        __import__(module)
