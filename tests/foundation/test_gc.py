"""`cmflow cache gc`: removes exactly what no committed manifest reaches, on a local root and on S3 (moto)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cmflow import cache
from cmflow.cli.main import main
from cmflow.gc import collect, find_garbage
from cmflow.storage import Storage

KEY_A, KEY_B, KEY_C = "a1" * 32, "b2" * 32, "c3" * 32
OLD = (datetime.now(timezone.utc) - timedelta(days=2)).strftime("%Y%m%dT%H%M%S")
NEW = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


def output(tmp_path: Path, name: str, size: int) -> Path:
    out = tmp_path / name
    out.mkdir()
    (out / "data.bin").write_bytes(b"x" * size)
    return out


def populate(storage: Storage, tmp_path: Path) -> dict[str, str]:
    """A committed key with a stray old attempt and finished work, a half-written old attempt of an
    uncommitted key, a fresh one (a commit in flight) and the checkpoints of an unfinished training."""
    committed = storage.commit("demo.kind", KEY_A, output(tmp_path, "a", 1000))
    prefix_a, prefix_b = (
        Storage.artifact_prefix("demo.kind", KEY_A),
        Storage.artifact_prefix("demo.kind", KEY_B),
    )
    prefix_c = Storage.artifact_prefix("demo.kind", KEY_C)
    keys = {
        "stray": f"{prefix_a}/attempts/{OLD}-deadbeef",
        "orphan": f"{prefix_b}/attempts/{OLD}-0badf00d",
        "in_flight": f"{prefix_c}/attempts/{NEW}-12345678",
        "kept_attempt": f"{prefix_a}/attempts/{committed.attempt}",
        "done_work": f"{Storage.work_prefix('demo.kind', KEY_A)}",
        "open_work": f"{Storage.work_prefix('demo.kind', KEY_B)}",
    }
    storage.write_bytes(f"{keys['stray']}/data.bin", b"s" * 300)
    storage.write_bytes(f"{keys['orphan']}/data.bin", b"o" * 200)
    storage.write_bytes(f"{keys['in_flight']}/data.bin", b"f" * 100)
    storage.write_bytes(f"{keys['done_work']}/ckpt/state.pt", b"w" * 50)
    storage.write_bytes(f"{keys['open_work']}/ckpt/state.pt", b"w" * 70)
    return keys


def test_finds_and_removes_only_unreachable_folders(storage: Storage, tmp_path: Path) -> None:
    keys = populate(storage, tmp_path)
    garbage = find_garbage(storage)
    assert {(g.key, g.reason, g.size) for g in garbage} == {
        (keys["stray"], "unreferenced attempt", 300),
        (keys["orphan"], "unreferenced attempt", 200),
        (keys["done_work"], "work of a committed key", 50),
    }
    assert collect(storage, garbage) == 550
    for name in ("stray", "orphan", "done_work"):
        assert not storage.list(keys[name]), name
    for name in ("in_flight", "open_work", "kept_attempt"):
        assert storage.list(keys[name]), name
    assert cache.lookup(storage, "demo.kind", KEY_A).hit  # the committed artifact still verifies
    assert find_garbage(storage) == []
    # a zero minimum age also takes the attempt that has no manifest yet
    assert [g.key for g in find_garbage(storage, min_age_s=0)] == [keys["in_flight"]]


def test_cli_dry_run_then_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = Storage(str(tmp_path / "root"))
    keys = populate(storage, tmp_path)
    root = str(tmp_path / "root")
    assert main(["cache", "gc", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "3 folders" in out and "dry run: pass --yes" in out
    assert storage.list(keys["stray"])  # nothing deleted without --yes
    assert main(["cache", "gc", "--root", root, "--yes", "--min-age", "30m"]) == 0
    assert "deleted 3 folders" in capsys.readouterr().out
    assert not storage.list(keys["stray"]) and storage.list(keys["in_flight"])
    assert main(["cache", "gc", "--root", root]) == 0
    assert "nothing to collect" in capsys.readouterr().out


def test_cli_bad_age_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "gc", "--root", str(tmp_path), "--min-age", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--min-age 'soon' is not an age" in err and "Traceback" not in err
