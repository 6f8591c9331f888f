"""The bad-input corpus: every case gets one line naming the problem and the fix, the right exit code,
no traceback, and nothing written to the store.

CLI cases run ``cmflow.cli.main.main`` (exit 2 for spec/usage/input, 1 for run failures). Data and
checkpoint cases run the stage the way a Ray worker does (:func:`cmflow.engine.worker.execute_stage`), and
check that the failure is one line and that no artifact was committed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cmflow.cli.main import main
from cmflow.engine.worker import StageTask, execute_stage
from cmflow.errors import StageError
from cmflow.spec import Resources

GOOD = """
name: bad-input
storage: {root: ROOT}
tracking: {enabled: false}
stages:
  a: {kind: demo.arrays, params: {n: 4}}
  b: {kind: demo.reduce, inputs: {a: a}}
"""


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "store"
        self.spec = self.write("spec.yaml", GOOD)

    def write(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text.replace("ROOT", str(self.root)))
        return str(path)

    def bad_spec(self, replace: str, by: str) -> str:
        assert replace in GOOD
        return self.write("bad.yaml", GOOD.replace(replace, by))


Case = tuple[str, Callable[[Env], list[str]], int, str]


def damaged_record(e: Env, run_id: str, text: str) -> str:
    """A ``runs/<run_id>/run.json`` that is corrupt or foreign (written before the store is snapshotted)."""
    path = e.root / "runs" / run_id / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return run_id


CLI_CASES: list[Case] = [
    (
        "malformed-yaml",
        lambda e: ["validate", e.write("m.yaml", "name: x\nstages: {a: [\n")],
        2,
        r"fix the YAML syntax",
    ),
    (
        "wrong-type",
        lambda e: ["validate", e.bad_spec("n: 4", "n: four")],
        2,
        r"params\.n: Input should be a valid integer",
    ),
    (
        "unknown-field",
        lambda e: ["validate", e.bad_spec("tracking:", "trackng:")],
        2,
        r"trackng is not a known field; did you mean 'tracking'",
    ),
    (
        "negative-size",
        lambda e: ["validate", e.bad_spec("n: 4", "n: -4")],
        2,
        r"params\.n: Input should be greater than or equal to 1",
    ),
    (
        "unknown-kind",
        lambda e: ["validate", e.bad_spec("demo.reduce", "demo.reduse")],
        2,
        r"is not a stage kind; did you mean 'demo\.reduce'",
    ),
    (
        "missing-input",
        lambda e: ["validate", e.bad_spec("{a: a}", "{a: zz}")],
        2,
        r"names stage 'zz', which is not declared",
    ),
    (
        "cycle",
        lambda e: ["validate", e.bad_spec("params: {n: 4}}", "inputs: {x: b}}")],
        2,
        r"takes no input 'x'",
    ),
    (
        "stage-name-traversal",
        lambda e: ["validate", e.bad_spec("  b:", "  ../b:")],
        2,
        r"stage name '\.\./b' must be",
    ),
    (
        "bad-storage-scheme",
        lambda e: ["validate", e.bad_spec("root: ", "root: gs://bucket/")],
        2,
        r"storage root scheme 'gs' is not supported",
    ),
    (
        "negative-seed",
        lambda e: ["validate", e.spec, "--set", "seed=-1"],
        2,
        r"seed: Input should be greater than or equal to 0",
    ),
    ("set-without-equals", lambda e: ["run", e.spec, "--set", "seed"], 2, r"is not KEY=VALUE"),
    (
        "set-unknown-stage",
        lambda e: ["run", e.spec, "--set", "stages.zz.params.n=1"],
        2,
        r"there is no stage 'zz'",
    ),
    (
        "unknown-option",
        lambda e: ["run", e.spec, "--frobnicate"],
        2,
        r"No such option: --frobnicate; see `cmflow run --help`",
    ),
    ("missing-argument", lambda e: ["validate"], 2, r"Missing argument 'SPEC'"),
    (
        "missing-spec-file",
        lambda e: ["plan", str(e.tmp / "nope.yaml")],
        2,
        r"does not exist; pass a YAML file",
    ),
    (
        "no-cache-unknown-stage",
        lambda e: ["run", e.spec, "--no-cache", "zz"],
        2,
        r"--no-cache names unknown stage\(s\) zz",
    ),
    (
        "run-id-traversal",
        lambda e: ["status", "../../etc", "--root", str(e.root)],
        2,
        r"run id '\.\./\.\./etc' is not valid",
    ),
    (
        "bad-run-id-option",
        lambda e: ["run", e.spec, "--run-id", "Bad/Id"],
        2,
        r"run id 'Bad/Id' is not valid",
    ),
    (
        "unknown-run",
        lambda e: ["resume", "no-such-run", "--root", str(e.root)],
        2,
        r"no run 'no-such-run' under",
    ),
    (
        "cache-explain-unknown-run",
        lambda e: ["cache", "explain", "nope", "a", "--root", str(e.root)],
        2,
        r"no run 'nope'",
    ),
    (
        "status-corrupt-run-json",
        lambda e: ["status", damaged_record(e, "cut", '{"run_id": "cut", "sta'), "--root", str(e.root)],
        2,
        r"runs/cut/run\.json is unreadable \(not JSON: .*\); restore it from a backup or move it aside",
    ),
    (
        "resume-foreign-run-json",
        lambda e: ["resume", damaged_record(e, "alien", '{"hello": 1}'), "--root", str(e.root)],
        2,
        r"runs/alien/run\.json is unreadable \(not a cmflow run record: .*hello.*\); restore it",
    ),
    (
        "storage-option-without-equals",
        lambda e: ["runs", "list", "--root", str(e.root), "--storage-option", "endpoint_url"],
        2,
        r"--storage-option 'endpoint_url' is not KEY=VALUE; write e\.g\.",
    ),
    ("schema-unknown-kind", lambda e: ["schema", "--stage", "nope"], 2, r"no stage kind 'nope'"),
    (
        "bad-cron",
        lambda e: ["schedule", "create", e.spec, "--cron", "61 * * * *", "--root", str(e.root)],
        2,
        r"cron",
    ),
    (
        "bad-timezone",
        lambda e: [
            "schedule",
            "create",
            e.spec,
            "--cron",
            "0 3 * * 1",
            "--timezone",
            "Mars/Olympus",
            "--root",
            str(e.root),
        ],
        2,
        r"Mars/Olympus",
    ),
    (
        "unknown-model",
        lambda e: ["models", "describe", "no-such-model", "--tracking-uri", f"sqlite:///{e.tmp}/m.db"],
        2,
        r"no-such-model",
    ),
    (
        "rollback-unknown-model",
        lambda e: ["models", "rollback", "no-such-model", "--tracking-uri", f"sqlite:///{e.tmp}/m.db"],
        2,
        r"no-such-model",
    ),
    (
        "fid-missing-file",
        lambda e: ["fid", "stats", str(e.tmp / "none.npz"), "--out", str(e.tmp / "s.npz")],
        2,
        r"none\.npz",
    ),
    (
        "fid-corrupt-npz",
        lambda e: ["fid", "stats", e.write("c.npz", "not a zip"), "--out", str(e.tmp / "s.npz")],
        2,
        r"c\.npz",
    ),
]


@pytest.mark.parametrize(("name", "argv", "code", "pattern"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    argv: Callable[[Env], list[str]],
    code: int,
    pattern: str,
) -> None:
    import re

    env = Env(tmp_path)
    args = argv(env)
    before = files_under(env.root)
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.fullmatch(r"error: \S.*; \S.*\n", err), f"no '; <fix>' part: {err}"  # the problem; the fix
    assert "Traceback" not in err
    assert re.search(pattern, err), err
    assert files_under(env.root) == before, "bad input wrote to the store"


@pytest.mark.usefixtures("ray_session")
def test_impossible_resources_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path)
    assert main(["run", env.spec, "--set", "stages.b.resources.gpus=2"]) == 2
    err = capsys.readouterr().err
    assert "stage 'b' needs" in err and "set stages.b.resources.gpus=0" in err and err.count("\n") == 1
    assert not env.root.exists()


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (this test's mount namespace: ``bash .ci/pytest`` runs as root in its own)."""
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.usefixtures("ray_session")
def test_read_only_or_full_store_is_one_line_and_leaves_a_true_record(
    small_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess

    env = Env(small_fs)
    env.root = small_fs / "store"
    spec = env.write("spec.yaml", GOOD)
    assert main(["run", spec, "--run-id", "rw-1"]) == 0
    capsys.readouterr()
    record = env.root / "runs" / "rw-1" / "run.json"

    def check(pattern: str) -> None:
        assert main(["resume", "rw-1", "--root", str(env.root)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert pattern in err and "then resume the run" in err, err
        assert "credentials" not in err and "AWS" not in err, err  # a local problem, not an S3 one
        assert json.loads(record.read_text())["status"] == "succeeded"  # the record stays true
        assert not list(env.root.rglob("*.tmp")), "a temp file was left behind"

    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    check("(Read-only file system); give this user write access to the storage root")
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    with open(small_fs / "filler", "wb", buffering=0) as handle:  # fill the store to the last byte
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    check("(No space left on device); free space on that filesystem")


@pytest.mark.usefixtures("ray_session")
def test_ctrl_c_exits_130_naming_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import signal
    import threading
    import time

    env = Env(tmp_path)
    record = env.root / "runs" / "int-1" / "run.json"

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if json.loads(record.read_text())["stages"]["a"]["status"] == "running":
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C delivers
        if not done.wait(2.0):  # a user presses it again when nothing happens
            os.kill(os.getpid(), signal.SIGINT)

    done = threading.Event()
    watcher = threading.Thread(target=interrupt_when_running, daemon=True)
    watcher.start()
    code = main(["run", env.spec, "--run-id", "int-1", "--set", "stages.a.params.sleep_s=6"])
    done.set()
    watcher.join()
    assert code == 130
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: run int-1 interrupted and recorded as stopped; resume with `cmflow resume int-1`"
    ], err
    assert "Traceback" not in err
    assert json.loads(record.read_text())["status"] == "stopped"


def test_missing_credentials(
    tmp_path: Path,
    s3_root: tuple[str, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, options = s3_root
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    spec = Env(tmp_path).bad_spec("root: ROOT", f"root: {root}, options: {json.dumps(options)}")
    assert main(["plan", spec]) == 2
    err = capsys.readouterr().err
    assert "check the credentials" in err and err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# Data and checkpoints: the stage fails with one line and commits nothing


def run_stage(
    tmp: Path, kind: str, params: dict[str, Any], inputs: dict[str, str] | None = None
) -> StageError:
    from cmflow.stages.table import STAGES

    root = tmp / "store"
    task = StageTask(
        run_id="bad-input",
        stage="s",
        kind=kind,
        params=STAGES[kind].params_model.model_validate(params).model_dump(mode="json"),
        cache_key="0" * 64,
        components={},
        seed=0,
        resources=Resources(cpus=1),
        storage_root=str(root),
        storage_options={},
        inputs=inputs or {},
    )
    with pytest.raises(StageError) as info:
        execute_stage(task)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert not list(root.rglob("manifest.json")), "a failed stage committed an artifact"
    return info.value


def _cifar_tar(path: Path, batch: Any, *, skip: str = "", extra: str = "") -> Path:
    """A CIFAR-10 python tarball whose data_batch_1 is ``batch`` (the others genuine and tiny)."""
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    members = [(f"data_batch_{i}", pickle.dumps(batch if i == 1 else good)) for i in range(1, 6)]
    members += [(extra, b"#!/bin/sh\n")] if extra else []
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            if name == skip:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/cmflow-bad-input-pickle-ran"


def _model_dir(tmp: Path, preset: str = "tiny") -> Path:
    from cmflow.models import EDMPrecond, make_unet
    from cmflow.models.io import save_model

    out = tmp / f"model-{preset}"
    save_model(EDMPrecond(make_unet(preset, 8, 1)), out)
    return out


DATA_CASES: list[tuple[str, Callable[[Path], dict[str, Any]], str]] = [
    (
        "cifar-not-a-tar",
        lambda t: {"source": "cifar10", "uri": str(_bytes(t / "c.tar.gz", b"\x00" * 100))},
        r"c\.tar\.gz",
    ),
    ("cifar-truncated", lambda t: {"source": "cifar10", "uri": str(_truncated_tar(t))}, r"truncated|corrupt"),
    ("cifar-pickle-with-code", lambda t: {"source": "cifar10", "uri": str(_code_tar(t))}, r"refused"),
    (
        "cifar-missing-member",
        lambda t: {"source": "cifar10", "uri": str(_cifar_tar(t / "m.tar.gz", {}, skip="data_batch_4"))},
        r"missing cifar-10-batches-py/data_batch_4; the tarball is incomplete",
    ),
    (
        "cifar-foreign-member",
        lambda t: {"source": "cifar10", "uri": str(_cifar_tar(t / "f.tar.gz", {}, extra="install.sh"))},
        r"foreign member 'cifar-10-batches-py/install\.sh'; pass the genuine",
    ),
    (
        "npz-truncated",
        lambda t: {"source": "npz", "uri": str(_bytes(t / "d.npz", _npz_bytes()[:40]))},
        r"d\.npz",
    ),
    (
        "npz-float-images",
        lambda t: {"source": "npz", "uri": str(_npz_file(t, np.zeros((4, 1, 8, 8), np.float32)))},
        r"uint8",
    ),
    (
        "image-folder-corrupt-png",
        lambda t: {"source": "image-folder", "uri": str(_bad_folder(t))},
        r"bad\.png",
    ),
    ("missing-uri-file", lambda t: {"source": "npz", "uri": str(t / "absent.npz")}, r"absent\.npz"),
    ("bad-uri-scheme", lambda t: {"source": "npz", "uri": "nosuchproto://x/y.npz"}, r"nosuchproto"),
]


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((4, 1, 8, 8), np.uint8))
    return buffer.getvalue()


def _npz_file(tmp: Path, images: np.ndarray) -> Path:
    path = tmp / "f.npz"
    np.savez(path, images=images)
    return path


def _truncated_tar(tmp: Path) -> Path:
    path = tmp / "t.tar.gz"
    rng = np.random.default_rng(0)  # incompressible, so half the file cuts into the batches
    _cifar_tar(path, {b"data": rng.integers(0, 256, (200, 3072), dtype=np.uint8), b"labels": [0] * 200})
    return _bytes(path, path.read_bytes()[: path.stat().st_size // 2])


def _code_tar(tmp: Path) -> Path:
    path = tmp / "code.tar.gz"
    _cifar_tar(path, {b"data": _RunsCode(), b"labels": [0]})
    return path


def _bad_folder(tmp: Path) -> Path:
    from PIL import Image

    folder = tmp / "imgs" / "cls"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "ok.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder.parent


@pytest.mark.parametrize(("name", "params", "pattern"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_dataset(
    tmp_path: Path, name: str, params: Callable[[Path], dict[str, Any]], pattern: str
) -> None:
    import re

    if os.path.exists(MARKER):
        os.unlink(MARKER)
    error = run_stage(tmp_path, "prepare_data", params(tmp_path))
    assert re.search(pattern, str(error)), str(error)
    assert not os.path.exists(MARKER), "an unpickled payload ran code"


def _commit_digits(tmp: Path) -> dict[str, str]:
    """A real prepare_data output, committed, as the teacher stage's input."""
    from cmflow.stages.table import STAGES
    from cmflow.storage import Storage

    root = tmp / "store"
    task = StageTask(
        run_id="bad-input",
        stage="data",
        kind="prepare_data",
        params=STAGES["prepare_data"]
        .params_model.model_validate({"source": "sklearn-digits", "max_images": 64})
        .model_dump(mode="json"),
        cache_key="1" * 64,
        components={},
        seed=0,
        resources=Resources(cpus=1),
        storage_root=str(root),
        storage_options={},
        inputs={},
    )
    text = execute_stage(task)
    Storage(str(root)).delete(f"{Storage.artifact_prefix('prepare_data', '1' * 64)}/manifest.json")
    return {"data": text}


def _checkpoint_case(tmp: Path, case: str) -> Path:
    folder = _model_dir(tmp)
    weights = folder / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif case == "wrong-architecture":
        other = _model_dir(tmp, "digits")
        weights.write_bytes((other / "model.safetensors").read_bytes())
    elif case == "pickle-with-code":
        weights.unlink()
        (folder / "model.pt").write_bytes(pickle.dumps(_RunsCode()))
    elif case == "bad-config":
        (folder / "model.json").write_text("{not json")
    return folder


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("truncated", r"model\.safetensors"),
        ("wrong-architecture", r"does not fit"),
        ("pickle-with-code", r"refused"),
        ("bad-config", r"model\.json is not valid JSON"),
    ],
)
def test_bad_checkpoint(tmp_path: Path, case: str, pattern: str) -> None:
    import re

    if os.path.exists(MARKER):
        os.unlink(MARKER)
    folder = _checkpoint_case(tmp_path, case)
    inputs = _commit_digits(tmp_path)
    error = run_stage(tmp_path, "teacher", {"uri": str(folder)}, inputs)
    assert re.search(pattern, str(error)), str(error)
    assert not os.path.exists(MARKER), "an unpickled checkpoint ran code"


# --------------------------------------------------------------------------------------------------
# Training inputs: refused before any Ray Train worker starts


def _damaged_dataset(tmp: Path, damage: str) -> dict[str, str]:
    from cmflow.storage import Manifest, Storage

    inputs = _commit_digits(tmp)
    manifest = Manifest.from_json(inputs["data"])
    shard = Path(Storage(str(tmp / "store")).path(
        f"{Storage.artifact_prefix('prepare_data', manifest.cache_key)}/attempts/{manifest.attempt}/shards/images-00000.npy"
    ))  # fmt: skip
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    return inputs


@pytest.mark.parametrize(
    ("case", "params", "workers", "pattern"),
    [
        (
            "shard-missing",
            {},
            1,
            r"dataset artifact is damaged \(file shards/images-00000\.npy is missing\); run the",
        ),
        (
            "shard-cut-short",
            {},
            1,
            r"dataset artifact is damaged \(file shards/images-00000\.npy has size 100",
        ),
        (
            "batch-not-divisible",
            {"batch_size": 15},
            2,
            r"batch_size 15 is not divisible by the 2 lanes \(one per worker\); use a multiple of 2",
        ),
        (
            "lanes-not-shared",
            {"lanes": 3},
            2,
            r"2 workers cannot share 3 lanes evenly; set params\.lanes to a multiple",
        ),
    ],
)
def test_bad_training_input(
    tmp_path: Path, case: str, params: dict[str, Any], workers: int, pattern: str
) -> None:
    import re

    from cmflow.stages.table import STAGES

    inputs = (
        _damaged_dataset(tmp_path, case.split("-")[1])
        if case.startswith("shard")
        else _commit_digits(tmp_path)
    )
    task = StageTask(
        run_id="bad-input",
        stage="s",
        kind="teacher",
        params=STAGES["teacher"]
        .params_model.model_validate({"preset": "tiny", "steps": 2, **params})
        .model_dump(mode="json"),
        cache_key="2" * 64,
        components={},
        seed=0,
        resources=Resources(cpus=1, workers=workers),
        storage_root=str(tmp_path / "store"),
        storage_options={},
        inputs=inputs,
    )
    with pytest.raises(StageError) as info:
        execute_stage(task)  # no Ray is running: the check comes before Ray Train is asked for workers
    assert re.search(pattern, str(info.value)) and "\n" not in str(info.value), str(info.value)
    assert not list((tmp_path / "store").rglob("teacher/**/manifest.json"))


@pytest.mark.usefixtures("ray_session")
def test_more_training_workers_than_the_cluster_places_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = Env(tmp_path)
    spec = env.write(
        "train.yaml",
        GOOD.replace(
            "  b: {kind: demo.reduce, inputs: {a: a}}",
            "  data: {kind: prepare_data, params: {source: sklearn-digits}}\n"
            "  teacher: {kind: teacher, inputs: {data: data}, resources: {cpus: 1, workers: 8}}",
        ),
    )
    assert main(["run", spec]) == 2
    err = capsys.readouterr().err
    assert "stage 'teacher' wants 8 training workers of CPU=1 but the cluster fits only 2" in err, err
    assert "lower stages.teacher.resources.workers" in err and err.count("\n") == 1
    assert not env.root.exists()
