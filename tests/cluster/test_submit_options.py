"""What `cmflow submit` builds, without a cluster: runtime_env, entrypoint, token and address resolution."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from cluster_helpers import demo_spec

from cmflow.errors import UsageError
from cmflow.submit import (
    ClusterTarget,
    build_runtime_env,
    check_root_reachable,
    entrypoint_command,
    parse_env,
    resolve_address,
    resolve_token,
)
from cmflow.validate import validate_spec


def test_runtime_env_is_valid_and_forwards_only_what_is_set(tmp_path: Path) -> None:
    from ray.runtime_env import RuntimeEnv

    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_ENDPOINT_URL": "http://s3:9000",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "RAY_AUTH_TOKEN": "t0k",
        "RAY_AUTH_MODE": "token",
        "HOME": "/x",
    }
    env = build_runtime_env(tmp_path, environ=environ, extra_env={"EXTRA": "1"})
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == str(tmp_path)
    package = Path(env["py_modules"][0])
    assert package.name == "cmflow" and (package / "submit.py").is_file()
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://s3:9000"
    assert env["env_vars"]["AWS_ACCESS_KEY_ID"] == "k" and env["env_vars"]["EXTRA"] == "1"
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    for never in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "HOME", "AWS_SESSION_TOKEN"):  # secrets / unset
        assert never not in env["env_vars"]
    quiet = build_runtime_env(tmp_path, environ=environ, forward_credentials=False, ship_code=False)
    assert "AWS_ACCESS_KEY_ID" not in quiet["env_vars"] and "py_modules" not in quiet
    assert quiet["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    actor = build_runtime_env(None, environ={})
    assert "working_dir" not in actor and actor["py_modules"]


def test_entrypoint_runs_the_same_driver_with_the_run_id() -> None:
    argv = shlex.split(entrypoint_command("tiny-1"))
    assert argv == [
        "python",
        "-m",
        "cmflow.cli.main",
        "run",
        "spec.yaml",
        "--run-id",
        "tiny-1",
        "--address",
        "auto",
    ]
    assert shlex.split(entrypoint_command("x", python="/opt/py 3/bin/python"))[0] == "/opt/py 3/bin/python"


def test_token_comes_from_file_then_env_then_path_then_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path = tmp_path / "path-token"
    path.write_text("from-path\n")
    explicit = tmp_path / "explicit"
    explicit.write_text("from-file\n")
    env = {"HOME": str(home), "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}
    assert resolve_token(explicit, env) == "from-file"
    assert resolve_token(None, env) == "from-env"
    assert resolve_token(None, {**env, "RAY_AUTH_TOKEN": ""}) == "from-path"
    assert resolve_token(None, {"HOME": str(home)}) == "from-home"
    assert resolve_token(None, {"HOME": str(tmp_path)}) is None
    with pytest.raises(UsageError, match="token file .* does not exist"):
        resolve_token(tmp_path / "missing", env)
    with pytest.raises(UsageError, match="RAY_AUTH_TOKEN_PATH names"):
        resolve_token(None, {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")})
    assert ClusterTarget("http://h:8265", "abc").headers() == {"Authorization": "Bearer abc"}
    assert ClusterTarget("http://h:8265").headers() == {}


def test_address_is_normalised_and_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address("head:8265") == "http://head:8265"
    assert resolve_address("https://head:8265/") == "https://head:8265"
    with pytest.raises(UsageError, match="pass --address http://HEAD:8265"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not a job server
    with pytest.raises(UsageError):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert resolve_address(None) == "http://api:8265"
    with pytest.raises(UsageError, match="not a job server URL"):
        resolve_address("ray://head:10001")


def test_env_items_and_local_roots(tmp_path: Path) -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(UsageError, match="is not KEY=VALUE"):
        parse_env(["nope"])
    spec = validate_spec(demo_spec(str(tmp_path / "root")))
    check_root_reachable(spec, "http://127.0.0.1:8265")  # same machine: fine
    check_root_reachable(spec, "http://head:8265", allow_local_root=True)  # shared filesystem: allowed
    with pytest.raises(UsageError, match="is a local path, which the cluster at http://head:8265 cannot see"):
        check_root_reachable(spec, "http://head:8265")
    s3 = validate_spec(demo_spec("s3://bucket/cmflow"))
    check_root_reachable(s3, "http://head:8265")


def test_status_of_a_local_run_is_unchanged_by_the_hook(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from cmflow.cli.main import main
    from cmflow.engine.records import RunRecord
    from cmflow.storage import Storage

    root = str(tmp_path / "root")
    spec = validate_spec(demo_spec(root))
    RunRecord.start("local-1", spec.redacted(), {n: s.kind for n, s in spec.stages.items()}).save(
        Storage(root)
    )
    assert main(["status", "local-1", "--root", root, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["run_id"] == "local-1" and "ray_job" not in data
    assert main(["logs", "local-1", "--root", root]) == 2
    assert "was not submitted to a cluster" in capsys.readouterr().err
