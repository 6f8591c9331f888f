"""Spec loading, overrides and validation: valid specs pass, each invalid one gets its one-line message."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cmflow.errors import SpecError
from cmflow.redact import redact
from cmflow.spec import apply_overrides, parse_override
from cmflow.validate import json_schema, load_spec

VALID = """
name: demo
seed: 3
storage: {root: ./store}
tracking: {enabled: false}
stages:
  a: {kind: demo.arrays, params: {n: 8}}
  b: {kind: demo.arrays, params: {n: 8, seed: 1}}
  total:
    kind: demo.reduce
    inputs: {a: a, b: b}
    resources: {cpus: 0.5}
    cache: {version: "2", ignore: [scale]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_spec_fills_defaults_and_resolves_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(tmp_path, VALID))
    assert spec.name == "demo" and spec.seed == 3
    assert spec.stages["a"].params == {
        "n": 8,
        "seed": 0,
        "sleep_s": 0.0,
        "fail": False,
        "transient_failures_marker": None,
        "rendezvous_dir": None,
        "rendezvous_peers": 2,
    }
    assert spec.storage.root == str(tmp_path / "store")
    assert spec.topological_order() == ["a", "b", "total"]
    assert spec.downstream_of(["a"]) == {"a", "total"}
    assert spec.stages["total"].resources.ray_options() == {"num_cpus": 0.5, "num_gpus": 0.0}


def test_overrides_are_revalidated(tmp_path: Path) -> None:
    spec = load_spec(
        write(tmp_path, VALID), ["stages.a.params.n=32", "seed=9", "stages.total.params.scale=1e-3"]
    )
    assert spec.stages["a"].params["n"] == 32 and spec.seed == 9
    assert spec.stages["total"].params["scale"] == pytest.approx(1e-3)
    with pytest.raises(SpecError, match=r"stages\.a\.params\.n: Input should be greater than or equal to 1"):
        load_spec(write(tmp_path, VALID), ["stages.a.params.n=-4"])


def test_parse_override_values() -> None:
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=hello") == (["x"], "hello")


def test_every_pipeline_file_validates() -> None:
    files = sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("*.yaml"))
    assert files, "pipelines/ holds no spec"
    for path in files:
        load_spec(path)


BAD = [
    (
        "name: demo\nstages: {a: {kind: demo.arrays}}\nbogus: 1\n",
        r"^.*: bogus is not a known field; .*allowed: name",
    ),
    (
        "name: demo\nstages: {a: {kind: demo.arays}}\n",
        r"stages\.a\.kind 'demo\.arays' is not a stage kind; did you mean 'demo\.arrays'",
    ),
    (
        "name: demo\nstages: {a: {kind: demo.arrays, params: {nn: 3}}}\n",
        r"stages\.a\.params\.nn is not a known field; did you mean 'n'",
    ),
    (
        "name: demo\nstages: {a: {kind: demo.arrays, params: {n: abc}}}\n",
        r"stages\.a\.params\.n: Input should be a valid integer.*got 'abc'",
    ),
    (
        "name: demo\nstages: {a: {kind: demo.arrays, params: {n: -1}}}\n",
        r"stages\.a\.params\.n: Input should be greater than or equal to 1",
    ),
    ("stages: {a: {kind: demo.arrays}}\n", r"name is required"),
    ("name: demo\nstages: {}\n", r"stages: Value error, a pipeline needs at least one stage"),
    (
        "name: Demo Pipeline\nstages: {a: {kind: demo.arrays}}\n",
        r"pipeline name 'Demo Pipeline' must be 1-63 characters",
    ),
    ("name: demo\nstages: {../evil: {kind: demo.arrays}}\n", r"stage name '\.\./evil' must be"),
    (
        "name: demo\nstages: {r: {kind: demo.reduce, inputs: {a: nowhere}}}\n",
        r"stages\.r\.inputs\.a names stage 'nowhere', which is not declared",
    ),
    (
        "name: demo\nstages: {r: {kind: demo.reduce, inputs: {zz: r}}}\n",
        r"demo\.reduce takes no input 'zz'; it takes: a, b, c, d",
    ),
    (
        "name: demo\nstages:\n  x: {kind: demo.reduce, inputs: {a: y}}\n  y: {kind: demo.reduce, inputs: {a: x}}\n",
        r"stages form a cycle: x -> y -> x",
    ),
    (
        "name: demo\nstages: {a: {kind: demo.arrays, resources: {cpus: -1}}}\n",
        r"stages\.a\.resources\.cpus: Input should be greater than or equal to 0",
    ),
    (
        "name: demo\nstages: {a: {kind: demo.arrays, resources: {gpu: 1}}}\n",
        r"stages\.a\.resources\.gpu is not a known field; did you mean 'gpus'",
    ),
    (
        "name: demo\nstages: {a: {kind: demo.arrays, cache: {ignore: [nope]}}}\n",
        r"cache\.ignore names 'nope', which is not a param of demo\.arrays",
    ),
    (
        "name: demo\nstorage: {root: 'gs://bucket/x'}\nstages: {a: {kind: demo.arrays}}\n",
        r"storage root scheme 'gs' is not supported",
    ),
    (
        "name: demo\nstages: {a: {kind: demo.arrays, retries: 99}}\n",
        r"stages\.a\.retries: Input should be less than or equal to 20",
    ),
    ("name: demo\nstages: [a, b]\n", r"stages: Input should be a valid dictionary"),
    (
        "name: demo\nstages: {a: {kind: demo.arrays, params: {n: 2}\n",
        r"spec\.yaml: .* at line \d+, column \d+; fix the YAML syntax",
    ),
    ("- just\n- a list\n", r"the top level must be a mapping"),
    (
        "name: demo\nseed: -3\nstages: {a: {kind: demo.arrays}}\n",
        r"seed: Input should be greater than or equal to 0",
    ),
    (
        "name: demo\nstages: {a: {kind: demo.arrays, resources: {custom: {fake_gpu: -2}}}}\n",
        r"custom resource 'fake_gpu' must be >= 0",
    ),
]


@pytest.mark.parametrize(("text", "pattern"), BAD, ids=[f"bad{i:02d}" for i in range(len(BAD))])
def test_invalid_specs_get_one_line_messages(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    assert __import__("re").search(pattern, message), message


def test_bad_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is not KEY=VALUE"):
        load_spec(write(tmp_path, VALID), ["seed"])
    with pytest.raises(SpecError, match="there is no stage 'zzz'; stages are: a, b, total"):
        apply_overrides({"name": "x", "stages": {"a": {}, "b": {}, "total": {}}}, ["stages.zzz.params.n=1"])
    with pytest.raises(SpecError, match="does not exist; pass a YAML file"):
        load_spec(tmp_path / "missing.yaml")


def test_redaction_of_secrets() -> None:
    data = {
        "storage": {"options": {"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://h:1"}},
        "tracking": {"uri": "http://bob:hunter2@mlflow:5000"},
    }
    text = json.dumps(redact(data))
    assert "AKIA123" not in text and "s3cr3t" not in text and "hunter2" not in text
    assert "http://h:1" in text and "bob:***@mlflow" in text


def test_schema_lists_stage_params() -> None:
    schema = json_schema()
    assert "stages" in schema["properties"]
    assert schema["stageParams"]["demo.arrays"]["properties"]["n"]["type"] == "integer"
