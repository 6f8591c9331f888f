"""The registered pyfunc model: load by alias, generate and edit, the sample/edit CLI, REST serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from registry_helpers import free_port, run_task, unique

from cmflow import registry
from cmflow.cli.main import main
from cmflow.mlflow_client import client_for
from cmflow.registry import load_pyfunc
from cmflow.storage import Manifest, Storage


@pytest.fixture()
def champion(
    storage: Storage, mlflow_server: str, model_artifact: Callable[..., Manifest]
) -> tuple[str, Manifest]:
    """A registered 8x8 grey model (with a 2-step schedule in model.json) promoted to champion."""
    name = unique("cm-serve")
    model = model_artifact(seed=5, sampling={"two_step_sigmas": [80.0, 0.8]})
    registered = run_task(
        storage, "register", {"model_name": name, "tracking_uri": mlflow_server}, {"model": model}
    )
    result = registry.promote(client_for(mlflow_server), name, "1", force=True, reason="test")
    assert result.outcome == "promoted"
    assert json.loads(storage.read_artifact_file(registered, "registered.json"))["version"] == "1"
    return name, model


def test_pyfunc_loads_by_alias_and_generates(champion: tuple[str, Manifest], mlflow_server: str) -> None:
    name, _ = champion
    model = load_pyfunc(f"models:/{name}@champion", mlflow_server)
    assert model.metadata.signature is not None
    assert "weights" in (model.metadata.flavors["python_function"].get("artifacts") or {})
    one = model.predict({"num_samples": 3, "steps": 1, "seed": 0})
    assert one.shape == (3, 1, 8, 8) and one.dtype == np.uint8
    again = model.predict({"num_samples": 2, "steps": 1, "seed": 0})
    np.testing.assert_array_equal(again, one[:2])  # per-sample seeds
    assert not np.array_equal(model.predict({"num_samples": 1, "seed": 9}), one[:1])
    two = model.predict([{"num_samples": 2, "steps": 2, "seed": 0}])
    sigmas = model.predict([{"num_samples": 2, "steps": [80.0, 0.8], "seed": 0}])
    np.testing.assert_array_equal(two, sigmas)  # steps=2 uses model.json's two_step_sigmas

    image = one[:1]
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 2:6] = 1  # 1 = generate
    edited = model.predict([{"task": "inpaint", "image": image, "mask": mask, "steps": 4, "seed": 1}])
    assert edited.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(edited[0, 0][mask == 0], image[0, 0][mask == 0])  # known pixels kept
    low = model.predict([{"task": "superres", "image": np.full((1, 1, 4, 4), 200, np.uint8), "steps": 3}])
    assert low.shape == (1, 1, 8, 8)
    with pytest.raises(Exception, match="3-channel"):
        model.predict([{"task": "colorize", "image": image}])
    # a misspelled field reaches cmflow (no input schema drops it first), and superres at factor 1 is refused
    with pytest.raises(
        Exception, match=r"^unknown request field\(s\) num_sampels; did you mean num_samples\?$"
    ):
        model.predict({"num_sampels": 2})
    with pytest.raises(Exception, match="would change nothing; send a smaller image"):
        model.predict([{"task": "superres", "image": image}])


def test_sample_and_edit_cli(champion: tuple[str, Manifest], mlflow_server: str, tmp_path: Path) -> None:
    from PIL import Image

    name, _ = champion
    uri = ["--tracking-uri", mlflow_server]
    grid = tmp_path / "grid.png"
    warnings.onceregistry.clear()  # MLflow shows its type-hint warning "once": make an earlier one not hide it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            main(["sample", f"models:/{name}@champion", "--steps", "1", "-n", "4", "--out", str(grid), *uri])
            == 0
        )
    assert not [w for w in caught if "type hints" in str(w.message)], [str(w.message) for w in caught]
    with Image.open(grid) as picture:
        assert picture.size[0] > 0 and picture.mode == "L"
    source = tmp_path / "digit.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(source)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), 2)).save(mask)
    out = tmp_path / "inpainted.png"
    args = [
        "edit",
        "inpaint",
        f"models:/{name}/1",
        "--image",
        str(source),
        "--mask",
        str(mask),
        "--steps",
        "3",
    ]
    assert main([*args, "--out", str(out), *uri]) == 0 and out.is_file()
    with Image.open(out) as picture:
        edited = np.asarray(picture)[::4, ::4]  # one 8x8 image, shown 4x (nearest neighbour)
    known = np.pad(np.zeros((4, 4), bool), 2, constant_values=True)  # black in the mask: kept
    assert edited.shape == (8, 8)
    # the kept border is the input (up to uint8 rounding); the centre was generated, not copied
    assert np.all(np.abs(edited[known].astype(int) - 128) <= 1)
    assert np.abs(edited[~known].astype(int) - 128).mean() > 10
    assert main(["edit", "inpaint", f"models:/{name}/1", "--image", str(source), *uri]) == 2  # no --mask
    assert main(["sample", f"models:/{name}@nobody", *uri]) == 2  # RegistryError: no such alias


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve did not answer /ping: {log.read_text()[-3000:]}")


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(
    champion: tuple[str, Manifest], mlflow_server: str, tmp_path: Path
) -> None:
    """``mlflow models serve -m models:/NAME@champion`` (a subprocess on 127.0.0.1) returns images."""
    name, _ = champion
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_REGISTRY_URI": mlflow_server}
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the scoring server: uvicorn
    )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{name}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "--workers",
        "1",
    ]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        answer = _post(url, {"dataframe_records": [{"num_samples": 2, "steps": 1, "seed": 3}]})
        images = np.asarray(answer["predictions"], dtype=np.uint8)
        assert images.shape == (2, 1, 8, 8)
        answer = _post(url, {"inputs": {"num_samples": 1, "steps": 2, "seed": 3}})
        assert np.asarray(answer["predictions"]).shape == (1, 1, 8, 8)
        bad = urllib.request.Request(
            f"{url}/invocations",
            data=b'{"inputs": {"task": "dream"}}',
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400 and b"not supported" in refused.value.read()
        typo = urllib.request.Request(
            f"{url}/invocations",
            data=b'{"inputs": {"num_sampels": 2}}',
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(typo, timeout=60)
        message = json.loads(refused.value.read())["message"]
        assert refused.value.code == 400 and message == (
            "unknown request field(s) num_sampels; did you mean num_samples?"
        )
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server's process group (the scoring server runs its own workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
