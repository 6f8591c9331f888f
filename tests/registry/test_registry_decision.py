"""Pure parts of the registry, packaging and tracking code: no MLflow server, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmflow.engine.tracking import flatten, numeric_items
from cmflow.errors import InputError, SpecError, UsageError
from cmflow.mlflow_client import resolve_tracking_uri
from cmflow.registry import Candidate, Gate, decide_promotion, parse_model_uri, report_metrics
from cmflow.serving import parse_request, sigmas_for
from cmflow.validate import validate_spec


def cand(version: str, fid: float | None, ref: str | None = "r") -> Candidate:
    return Candidate(version, {} if fid is None else {"fid_1step": fid}, ref)


GATE = Gate(metric="fid_1step", max_fid=50.0, tolerance=0.1)

# (candidate, champion, gate, expected action, words the reason must contain)
DECISIONS = [
    (cand("2", 20.0), None, GATE, "promote", "no champion"),
    (cand("2", 60.0), None, GATE, "reject", "max_fid"),
    (cand("2", 60.0), None, Gate(max_fid=None), "promote", "no champion"),
    (cand("2", 21.9), cand("1", 20.0), GATE, "promote", "<= champion v1"),
    (cand("2", 22.0), cand("1", 20.0), GATE, "promote", "<= champion v1"),  # boundary: 20 x 1.1 = 22
    (cand("2", 22.1), cand("1", 20.0), GATE, "reject", "> champion v1"),
    (cand("2", 19.0), cand("1", 20.0), Gate(tolerance=0.0), "promote", "<= champion"),
    (cand("2", 20.0), cand("1", 20.0), Gate(tolerance=0.0), "promote", "<= champion"),
    (cand("2", 20.1), cand("1", 20.0), Gate(tolerance=0.0), "reject", "> champion"),
    (cand("2", None), cand("1", 20.0), GATE, "reject", "no finite fid_1step"),
    (cand("2", math.nan), None, GATE, "reject", "no finite"),
    (cand("2", 10.0), cand("1", None), GATE, "reject", "champion v1 has no finite"),
    (cand("2", 10.0, "a"), cand("1", 20.0, "b"), GATE, "reject", "different reference"),
    (cand("2", 10.0, None), cand("1", 20.0, "b"), GATE, "promote", "<="),  # unknown ref: comparable
    (cand("1", 10.0), cand("1", 10.0), GATE, "noop", "already the champion"),
    (cand("2", 10.0), cand("1", 20.0), Gate(policy="manual"), "hold", "policy is manual"),
    (cand("2", 30.0), cand("1", 20.0), Gate(policy="manual"), "reject", "> champion"),
    (Candidate("2", {"fid_2step": 5.0}), cand("1", 20.0), GATE, "reject", "no finite fid_1step"),
    (
        Candidate("2", {"fid_2step": 5.0}),
        Candidate("1", {"fid_2step": 6.0}),
        Gate(metric="fid_2step"),
        "promote",
        "fid_2step",
    ),
]


@pytest.mark.parametrize(("candidate", "champion", "gate", "action", "words"), DECISIONS)
def test_decide_promotion(
    candidate: Candidate, champion: Candidate | None, gate: Gate, action: str, words: str
) -> None:
    decision = decide_promotion(candidate, champion, gate)
    assert decision.action == action, decision.reason
    assert words in decision.reason
    assert decision.passed == (action in {"promote", "hold"})


def test_decision_records_the_numbers() -> None:
    decision = decide_promotion(cand("2", 21.0), cand("1", 20.0), GATE)
    assert (decision.candidate_value, decision.champion_value) == (21.0, 20.0)
    assert decision.threshold == pytest.approx(22.0)


def test_report_metrics_keeps_finite_gate_numbers() -> None:
    meta = {
        "fid_1step": 12.5,
        "fid_2step": 9,
        "nfe_teacher": 35,
        "kid_1step": 0.01,
        "flag": True,
        "fid_x": math.inf,
        "fid_teacher": None,
        "ref_stats_digest": "abc",
        "steps": 100,
    }
    expected = {"fid_1step": 12.5, "fid_2step": 9.0, "nfe_teacher": 35.0, "kid_1step": 0.01}
    assert report_metrics(meta) == {**expected, "nfe_1step": 1.0, "nfe_2step": 2.0}  # NFE implied by the FID


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/cm@champion", ("cm", None, "champion")),
        ("models:/cm/3", ("cm", "3", None)),
        ("models:/m-0123abcd", ("m-0123abcd", None, None)),
    ],
)
def test_parse_model_uri(uri: str, expected: tuple[str, str | None, str | None]) -> None:
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize("uri", ["runs:/abc/model", "models:/", "models:/cm/latest", "models:/cm@"])
def test_parse_model_uri_refuses(uri: str) -> None:
    with pytest.raises(UsageError, match="models:/NAME@ALIAS"):
        parse_model_uri(uri)


# --------------------------------------------------------------------------------------------------
# pyfunc requests


def test_parse_request_defaults_and_forms() -> None:
    import pandas as pd

    assert parse_request({}).task == "generate"
    assert parse_request({}).num_samples == 1
    one = parse_request([{"num_samples": 4, "steps": 2, "seed": 7}])
    assert (one.num_samples, one.steps, one.seed) == (4, 2, 7)
    frame = parse_request(pd.DataFrame([{"num_samples": 3, "steps": [80.0, 0.8], "seed": None}]))
    assert frame.steps == (80.0, 0.8) and frame.seed == 0
    image = np.zeros((2, 1, 8, 8), dtype=np.uint8)
    edit = parse_request({"task": "inpaint", "image": image, "mask": np.ones((8, 8))})
    assert edit.num_samples == 2 and edit.mask.dtype == bool and edit.mask.shape == (1, 1, 8, 8)
    labels = parse_request({"num_samples": 3, "class_labels": [1]})
    assert labels.class_labels == (1,)


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        ({"task": "dream"}, "not supported"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 2.5}, "num_samples"),
        ({"steps": 0}, "steps"),
        ({"steps": [0.5, 80.0]}, "decreasing"),
        ({"steps": "many"}, "steps"),
        ({"task": "inpaint"}, "needs an image"),
        ({"task": "inpaint", "image": np.zeros((8, 8))}, "needs a mask"),
        ({"task": "colorize", "image": np.full((8, 8), 300)}, "uint8"),
        ({"num_samples": 3, "class_labels": [1, 2]}, "class_labels"),
        ({"colour": 1}, "unknown request field"),
        ([{"a": 1}, {"b": 2}], "one request"),
    ],
)
def test_parse_request_refuses(request_: object, words: str) -> None:
    with pytest.raises(InputError, match=words):
        parse_request(request_)


def test_sigmas_for_counts_and_lists() -> None:
    config = {"precond": {"sigma_min": 0.002, "sigma_max": 80.0}}
    assert sigmas_for(1, config) == [80.0]
    two = sigmas_for(2, config)
    assert two[0] == 80.0 and 0.002 < two[1] < 80.0 and len(two) == 2
    assert sigmas_for(2, {**config, "sampling": {"two_step_sigmas": [80.0, 0.821]}}) == [80.0, 0.821]
    assert sigmas_for((80.0, 1.0), config) == [80.0, 1.0]
    edit = sigmas_for(None, config, "inpaint")
    assert len(edit) == 18 and edit[0] == 80.0 and edit[-1] == pytest.approx(0.002)
    with pytest.raises(InputError, match="must lie in"):
        sigmas_for((100.0, 1.0), config)


# --------------------------------------------------------------------------------------------------
# tracking helpers


def test_flatten_and_numeric_items() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": None}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "x",
        "e": "null",
    }
    assert numeric_items({"a": 1, "b": {"c": 2.5}, "d": "x", "e": True, "f": math.nan}) == {
        "a": 1.0,
        "b.c": 2.5,
    }


def _resolve(root: str, uri: str | None = None) -> str:
    spec = validate_spec(
        {"name": "t", "storage": {"root": root}, "tracking": {"uri": uri}, "stages": {}}
        | {"stages": {"a": {"kind": "demo.arrays"}}}
    )
    return resolve_tracking_uri(spec.tracking.uri, spec.storage.root)


def test_tracking_uri_resolution_order(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """tracking.uri, then $MLFLOW_TRACKING_URI, then SQLite under a local root; an s3 root has no default."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _resolve(str(tmp_path / "r")) == f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}"
    assert _resolve("s3://b/x", uri="http://mlflow:5000") == "http://mlflow:5000"
    with pytest.raises(SpecError, match="tracking.uri .*MLFLOW_TRACKING_URI"):
        _resolve("s3://b/x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-mlflow:5000")
    assert _resolve("s3://b/x") == "http://env-mlflow:5000"
    assert _resolve(str(tmp_path / "r")) == "http://env-mlflow:5000"
    assert _resolve("s3://b/x", uri="http://mlflow:5000") == "http://mlflow:5000"


def test_register_params_refuse_a_password_in_the_uri() -> None:
    with pytest.raises(SpecError, match="must not contain a password"):
        validate_spec(
            {
                "name": "t",
                "stages": {
                    "m": {"kind": "demo.arrays"},
                    "r": {
                        "kind": "register",
                        "inputs": {"model": "m"},
                        "params": {"model_name": "cm", "tracking_uri": "http://u:secret@host:5000"},
                    },
                },
            }
        )
    with pytest.raises(SpecError, match="model_name"):
        validate_spec(
            {
                "name": "t",
                "stages": {
                    "m": {"kind": "demo.arrays"},
                    "r": {"kind": "register", "inputs": {"model": "m"}, "params": {"model_name": "a/b"}},
                },
            }
        )
