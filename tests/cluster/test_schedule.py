"""Schedules with an injected clock and a fake submitter: catch-up, DST, exactly-once, triggers, restarts."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from cluster_helpers import FakeSubmitter, demo_spec, write_spec

from cmflow.cli.main import main
from cmflow.errors import SpecError
from cmflow.schedule.cron import iso, next_fire_time, parse_time
from cmflow.schedule.store import (
    Schedule,
    create_schedule,
    history,
    load_schedule,
    load_state,
    new_schedule,
    set_enabled,
)
from cmflow.schedule.tick import tick
from cmflow.storage import Manifest, Storage
from cmflow.validate import validate_spec


def t(text: str) -> datetime:
    return parse_time(text)


def make(storage: Storage, *, created: str, **kwargs) -> Schedule:  # noqa: ANN003
    spec = validate_spec(demo_spec(storage.root)).model_dump(mode="json")
    schedule = new_schedule(spec, now=t(created), **kwargs)
    create_schedule(storage, schedule)
    return schedule


def run_ticks(storage: Storage, fake: FakeSubmitter, start: str, end: str, every_min: int) -> list:
    fires, now, stop = [], t(start), t(end)
    while now <= stop:
        fires += tick(now, storage, fake)
        now += timedelta(minutes=every_min)
    return fires


def fired_times(fires: list) -> list[str]:
    return [f.fire_time for f in fires if f.outcome == "submitted"]


@pytest.fixture()
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "root"))


# ---------------------------------------------------------------------------------------------- catch-up


def test_catchup_latest_fires_only_the_most_recent_missed_time(storage: Storage, fake: FakeSubmitter) -> None:
    make(storage, created="2026-03-02T00:30:00Z", cron="0 * * * *", catchup="latest", schedule_id="hourly")
    fires = tick(t("2026-03-02T05:10:00Z"), storage, fake)
    assert fired_times(fires) == ["2026-03-02T05:00:00Z"]
    assert fake.submitted == [f"cmflow-hourly-{int(t('2026-03-02T05:00:00Z').timestamp())}"]
    assert tick(t("2026-03-02T05:20:00Z"), storage, fake) == []  # nothing new is due
    assert fired_times(tick(t("2026-03-02T06:00:00Z"), storage, fake)) == ["2026-03-02T06:00:00Z"]


def test_catchup_all_fires_every_missed_time_oldest_first_up_to_max(
    storage: Storage, fake: FakeSubmitter
) -> None:
    make(storage, created="2026-03-02T00:30:00Z", cron="0 * * * *", catchup="all", schedule_id="every")
    fires = tick(t("2026-03-02T05:10:00Z"), storage, fake)
    assert fired_times(fires) == [f"2026-03-02T0{h}:00:00Z" for h in range(1, 6)]
    make(
        storage,
        created="2026-03-02T00:30:00Z",
        cron="0 * * * *",
        catchup="all",
        schedule_id="capped",
        max_catchup=3,
    )
    fires = tick(t("2026-03-02T05:10:00Z"), storage, fake, ids=["capped"])
    assert fired_times(fires) == ["2026-03-02T03:00:00Z", "2026-03-02T04:00:00Z", "2026-03-02T05:00:00Z"]


def test_catchup_none_skips_fires_older_than_the_deadline(storage: Storage, fake: FakeSubmitter) -> None:
    make(
        storage,
        created="2026-03-02T00:30:00Z",
        cron="0 * * * *",
        catchup="none",
        starting_deadline_s=300,
        schedule_id="strict",
    )
    assert tick(t("2026-03-02T05:10:00Z"), storage, fake) == []  # 05:00 is 10 min late: skipped
    assert tick(t("2026-03-02T05:59:00Z"), storage, fake) == []
    assert fired_times(tick(t("2026-03-02T06:04:00Z"), storage, fake)) == ["2026-03-02T06:00:00Z"]
    assert len(fake.submitted) == 1


def test_weekly_cron_follows_the_time_zone(storage: Storage, fake: FakeSubmitter) -> None:
    make(
        storage,
        created="2026-03-01T00:00:00Z",
        cron="0 3 * * 1",
        timezone_name="Europe/Paris",
        schedule_id="weekly",
    )
    fires = run_ticks(storage, fake, "2026-03-01T00:00:00Z", "2026-04-07T00:00:00Z", every_min=60)
    # Mondays 03:00 Paris: 02:00Z in winter (CET), 01:00Z after the 2026-03-29 switch (CEST)
    assert fired_times(fires) == [
        "2026-03-02T02:00:00Z",
        "2026-03-09T02:00:00Z",
        "2026-03-16T02:00:00Z",
        "2026-03-23T02:00:00Z",
        "2026-03-30T01:00:00Z",
        "2026-04-06T01:00:00Z",
    ]


# ---------------------------------------------------------------------------------------------- DST


def test_spring_forward_nonexistent_time_fires_once_at_the_end_of_the_gap(
    storage: Storage, fake: FakeSubmitter
) -> None:
    make(
        storage,
        created="2026-03-27T12:00:00Z",
        cron="30 2 * * *",
        timezone_name="Europe/Paris",
        schedule_id="daily",
    )
    fires = run_ticks(storage, fake, "2026-03-27T12:00:00Z", "2026-03-30T12:00:00Z", every_min=15)
    # 02:30 does not exist on 2026-03-29 (02:00 CET -> 03:00 CEST): it fires once, at 03:00 CEST = 01:00Z
    assert fired_times(fires) == ["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]


def test_spring_forward_collapses_several_skipped_times_into_one(
    storage: Storage, fake: FakeSubmitter
) -> None:
    make(
        storage,
        created="2026-03-29T00:25:00Z",
        cron="*/20 * * * *",
        timezone_name="Europe/Paris",
        schedule_id="often",
        catchup="all",
    )
    fires = run_ticks(storage, fake, "2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z", every_min=5)
    # 01:40 CET (00:40Z); 02:00, 02:20, 02:40 do not exist -> one fire at 03:00 CEST (01:00Z); 03:20 CEST (01:20Z)
    assert fired_times(fires) == ["2026-03-29T00:40:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:20:00Z"]


def test_fall_back_repeated_time_fires_once_at_its_first_occurrence(
    storage: Storage, fake: FakeSubmitter
) -> None:
    make(
        storage,
        created="2026-10-24T12:00:00Z",
        cron="30 2 * * *",
        timezone_name="Europe/Paris",
        schedule_id="daily",
    )
    fires = run_ticks(storage, fake, "2026-10-24T12:00:00Z", "2026-10-26T12:00:00Z", every_min=10)
    # 02:30 happens twice on 2026-10-25 (CEST 00:30Z, then CET 01:30Z): it fires once, at 00:30Z
    assert fired_times(fires) == ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
    hourly = make(
        storage,
        created="2026-10-24T22:30:00Z",
        cron="0 * * * *",
        timezone_name="Europe/Paris",
        schedule_id="hourly",
    )
    fires = run_ticks(storage, fake, "2026-10-24T22:30:00Z", "2026-10-25T03:30:00Z", every_min=10)
    mine = [f for f in fires if f.schedule_id == hourly.id]
    # 01:00 CEST, 02:00 CEST, (02:00 CET is the same wall time: no second fire), 03:00 CET, 04:00 CET
    assert fired_times(mine) == [
        "2026-10-24T23:00:00Z",
        "2026-10-25T00:00:00Z",
        "2026-10-25T02:00:00Z",
        "2026-10-25T03:00:00Z",
    ]


# ---------------------------------------------------------------------------------------------- exactly once


def test_concurrent_ticks_fire_each_time_exactly_once(storage: Storage, fake: FakeSubmitter) -> None:
    make(storage, created="2026-03-02T00:30:00Z", cron="0 * * * *", catchup="all", schedule_id="race")
    threads, barrier, results = 4, threading.Barrier(4), []
    lock = threading.Lock()

    def worker() -> None:
        own = Storage(storage.root)  # each "scheduler" has its own store client
        barrier.wait()
        fires = tick(t("2026-03-02T06:10:00Z"), own, fake)
        with lock:
            results.extend(fires)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert len(fake.submitted) == 6 == len(set(fake.submitted))  # 01:00 .. 06:00, each once
    assert sorted(f.fire_time for f in results if f.outcome == "submitted") == [
        f"2026-03-02T0{h}:00:00Z" for h in range(1, 7)
    ]
    assert all(f.outcome in {"submitted", "taken"} for f in results)
    markers = history(storage, load_schedule(storage, "race"))
    assert len(markers) == 6 and {m["status"] for m in markers} == {"submitted"}


def test_concurrent_ticks_on_s3_fire_once(s3_root: tuple[str, dict], fake: FakeSubmitter) -> None:
    root, options = s3_root
    storage = Storage(root, options)
    spec = validate_spec(demo_spec(root, options=options)).model_dump(mode="json")
    create_schedule(
        storage, new_schedule(spec, now=t("2026-03-02T00:30:00Z"), cron="0 * * * *", schedule_id="s3")
    )
    barrier = threading.Barrier(3)

    def worker() -> None:
        own = Storage(root, options)
        barrier.wait()
        tick(t("2026-03-02T01:05:00Z"), own, fake)

    pool = [threading.Thread(target=worker) for _ in range(3)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert fake.submitted == [f"cmflow-s3-{int(t('2026-03-02T01:00:00Z').timestamp())}"]


def test_a_lost_state_file_is_rebuilt_from_the_markers(storage: Storage, fake: FakeSubmitter) -> None:
    schedule = make(
        storage, created="2026-03-02T00:30:00Z", cron="0 * * * *", catchup="all", schedule_id="rebuild"
    )
    tick(t("2026-03-02T03:10:00Z"), storage, fake)
    storage.delete(f"{schedule.prefix}/state.json")  # e.g. a scheduler restarted on a fresh machine
    state = load_state(storage, schedule)
    assert state.cursor == "2026-03-02T03:00:00Z" and state.last_run_id == fake.submitted[-1]
    tick(t("2026-03-02T04:10:00Z"), storage, fake)
    assert len(fake.submitted) == 4 == len(set(fake.submitted))


def test_a_failed_submission_is_retried_with_the_same_id(storage: Storage, fake: FakeSubmitter) -> None:
    make(storage, created="2026-03-02T00:30:00Z", cron="0 * * * *", schedule_id="flaky")
    fake.failures = 1
    fires = tick(t("2026-03-02T01:05:00Z"), storage, fake)
    assert [f.outcome for f in fires] == ["failed"] and "will retry" in fires[0].reason
    fires = tick(t("2026-03-02T01:06:00Z"), storage, fake)
    assert [f.outcome for f in fires] == ["submitted"] and fires[0].run_id == fake.submitted[0]
    assert tick(t("2026-03-02T01:07:00Z"), storage, fake) == []


# ---------------------------------------------------------------------------------------------- enable / disable


def test_a_disabled_schedule_never_fires_and_enabling_does_not_catch_up(
    storage: Storage, fake: FakeSubmitter
) -> None:
    make(storage, created="2026-03-02T00:30:00Z", cron="*/10 * * * *", catchup="all", schedule_id="paused")
    set_enabled(storage, "paused", False, now=t("2026-03-02T00:31:00Z"))
    assert run_ticks(storage, fake, "2026-03-02T00:40:00Z", "2026-03-02T12:00:00Z", every_min=7) == []
    assert fake.submitted == []
    set_enabled(storage, "paused", True, now=t("2026-03-02T12:05:00Z"))
    fires = tick(t("2026-03-02T12:21:00Z"), storage, fake)
    assert fired_times(fires) == ["2026-03-02T12:10:00Z", "2026-03-02T12:20:00Z"]  # nothing from 00:40-12:00


# ---------------------------------------------------------------------------------------------- concurrency


def test_concurrency_forbid_skips_while_the_previous_run_is_active(storage: Storage) -> None:
    fake = FakeSubmitter(finish=False)
    make(
        storage, created="2026-03-02T00:30:00Z", cron="0 * * * *", concurrency="forbid", schedule_id="forbid"
    )
    first = tick(t("2026-03-02T01:01:00Z"), storage, fake)
    second = tick(t("2026-03-02T02:01:00Z"), storage, fake)
    assert [f.outcome for f in first + second] == ["submitted", "skipped"]
    assert "still RUNNING" in second[0].reason and len(fake.submitted) == 1
    fake.statuses[fake.submitted[0]] = "SUCCEEDED"
    assert [f.outcome for f in tick(t("2026-03-02T03:01:00Z"), storage, fake)] == ["submitted"]


def test_concurrency_replace_stops_the_previous_run(storage: Storage) -> None:
    fake = FakeSubmitter(finish=False)
    make(
        storage,
        created="2026-03-02T00:30:00Z",
        cron="0 * * * *",
        concurrency="replace",
        schedule_id="replace",
    )
    tick(t("2026-03-02T01:01:00Z"), storage, fake)
    fires = tick(t("2026-03-02T02:01:00Z"), storage, fake)
    assert fake.stopped == [fake.submitted[0]] and len(fake.submitted) == 2
    assert fires[0].outcome == "submitted" and "replaced" in fires[0].reason


def test_concurrency_allow_overlaps(storage: Storage) -> None:
    fake = FakeSubmitter(finish=False)
    make(storage, created="2026-03-02T00:30:00Z", cron="0 * * * *", concurrency="allow", schedule_id="allow")
    run_ticks(storage, fake, "2026-03-02T01:01:00Z", "2026-03-02T03:01:00Z", every_min=60)
    assert len(fake.submitted) == 3 and fake.stopped == []


# ---------------------------------------------------------------------------------------------- data triggers


def write_manifest(path: Path, n: int) -> str:
    manifest = Manifest(
        kind="dataset",
        cache_key=f"{n:064x}",
        attempt="a",
        files={"data.npy": {"sha256": f"{n:064x}", "size": n}},
        meta={"version": n},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest.to_json())
    return manifest.digest


def test_data_trigger_fires_once_per_new_digest(
    storage: Storage, fake: FakeSubmitter, tmp_path: Path
) -> None:
    watched = tmp_path / "datasets" / "latest" / "manifest.json"
    make(storage, created="2026-03-02T00:00:00Z", trigger_manifest=str(watched), schedule_id="ondata")
    assert tick(t("2026-03-02T00:01:00Z"), storage, fake) == []  # no manifest yet
    d1 = write_manifest(watched, 1)
    assert [f.outcome for f in tick(t("2026-03-02T00:02:00Z"), storage, fake)] == ["submitted"]
    assert tick(t("2026-03-02T00:03:00Z"), storage, fake) == []  # same digest: nothing
    d2 = write_manifest(watched, 2)
    fires = tick(t("2026-03-02T00:04:00Z"), storage, fake) + tick(t("2026-03-02T00:05:00Z"), storage, fake)
    assert [f.outcome for f in fires] == ["submitted"]
    assert fake.submitted == [f"cmflow-ondata-d{d1[:16]}", f"cmflow-ondata-d{d2[:16]}"]
    assert fake.metadata[fake.submitted[1]]["cmflow_trigger_digest"] == d2
    write_manifest(watched, 1)  # back to an old dataset: that digest already fired
    tick(t("2026-03-02T00:06:00Z"), storage, fake)
    assert len(fake.submitted) == 2


def test_data_trigger_baseline_and_concurrent_ticks(
    storage: Storage, fake: FakeSubmitter, tmp_path: Path
) -> None:
    watched = tmp_path / "manifest.json"
    write_manifest(watched, 7)
    make(storage, created="2026-03-02T00:00:00Z", trigger_manifest=str(watched), schedule_id="baseline")
    assert tick(t("2026-03-02T00:01:00Z"), storage, fake) == []  # the digest at creation does not fire
    write_manifest(watched, 8)
    barrier = threading.Barrier(3)

    def worker() -> None:
        barrier.wait()
        tick(t("2026-03-02T00:02:00Z"), Storage(storage.root), fake)

    pool = [threading.Thread(target=worker) for _ in range(3)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert len(fake.submitted) == 1


def test_data_trigger_on_s3_reads_the_manifest_directly(
    s3_root: tuple[str, dict], fake: FakeSubmitter
) -> None:
    root, options = s3_root
    storage = Storage(root, options)
    spec = validate_spec(demo_spec(root, options=options)).model_dump(mode="json")
    uri = f"{root}/datasets/latest/manifest.json"
    create_schedule(
        storage,
        new_schedule(
            spec,
            now=t("2026-03-02T00:00:00Z"),
            trigger_manifest=uri,
            trigger_options=options,
            schedule_id="s3data",
        ),
    )
    assert tick(t("2026-03-02T00:01:00Z"), storage, fake) == []
    for n in (1, 2):
        manifest = Manifest(kind="dataset", cache_key=f"{n:064x}", attempt="a", files={}, meta={"n": n})
        storage.write_bytes("datasets/latest/manifest.json", manifest.to_json().encode())
        assert [f.outcome for f in tick(t(f"2026-03-02T00:0{n + 1}:00Z"), storage, fake)] == ["submitted"]
    assert len(fake.submitted) == 2


def test_cron_plus_trigger_fires_at_cron_times_only_with_new_data(
    storage: Storage, fake: FakeSubmitter, tmp_path: Path
) -> None:
    watched = tmp_path / "manifest.json"
    write_manifest(watched, 1)
    make(
        storage,
        created="2026-03-02T00:30:00Z",
        cron="0 * * * *",
        trigger_manifest=str(watched),
        schedule_id="both",
    )
    first = tick(t("2026-03-02T01:01:00Z"), storage, fake)
    assert [(f.outcome, f.reason) for f in first] == [("skipped", "no new data since the last run")]
    write_manifest(watched, 2)
    assert tick(t("2026-03-02T01:30:00Z"), storage, fake) == []  # not a cron time
    assert [f.outcome for f in tick(t("2026-03-02T02:01:00Z"), storage, fake)] == ["submitted"]
    assert [f.outcome for f in tick(t("2026-03-02T03:01:00Z"), storage, fake)] == ["skipped"]


# ---------------------------------------------------------------------------------------------- validation + CLI


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"cron": "0 3 * *"}, "must have 5 fields"),
        ({"cron": "99 3 * * *"}, "is not valid"),
        ({"cron": "0 3 * * 1", "timezone_name": "Mars/Olympus"}, "time zone 'Mars/Olympus' is unknown"),
        ({"cron": "0 3 * * 1", "catchup": "sometimes"}, "catchup"),
        ({}, "needs a cron expression, a trigger manifest, or both"),
        ({"cron": "0 0 30 2 *"}, "never fires"),
        ({"cron": "0 3 * * 1", "schedule_id": "Bad_Id"}, "schedule id 'Bad_Id'"),
    ],
)
def test_bad_schedules_are_refused_with_one_line(storage: Storage, kwargs: dict, needle: str) -> None:
    spec = validate_spec(demo_spec(storage.root)).model_dump(mode="json")
    with pytest.raises(SpecError) as info:
        new_schedule(spec, now=t("2026-03-02T00:00:00Z"), **kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message and "; " in message  # the problem; the fix
    assert not message.startswith("schedule:")


def test_cli_schedule_error_is_one_clean_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(tmp_path / "tiny.yaml", demo_spec(str(tmp_path / "root")))
    assert main(["schedule", "create", str(spec), "--cron", "61 * * *"]) == 2
    assert capsys.readouterr().err == (
        "error: cron '61 * * *' must have 5 fields (minute hour day month weekday); "
        "e.g. '0 3 * * 1' is Mondays at 03:00\n"
    )


def test_cli_create_list_disable_enable_delete_export(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "root")
    spec = write_spec(tmp_path / "tiny.yaml", demo_spec(root))
    assert (
        main(
            [
                "schedule",
                "create",
                str(spec),
                "--cron",
                "0 3 * * 1",
                "--timezone",
                "Europe/Paris",
                "--catchup",
                "all",
                "--concurrency",
                "replace",
                "--id",
                "weekly",
            ]
        )
        == 0
    )
    assert "created schedule weekly" in capsys.readouterr().out
    assert main(["schedule", "create", str(spec), "--cron", "0 3 * * 1", "--id", "weekly"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["schedule", "list", "--root", root, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["id"] == "weekly" and row["enabled"] and row["next_fire_local"].endswith(("CET", "CEST"))
    assert main(["schedule", "disable", "weekly", "--root", root]) == 0
    assert main(["schedule", "tick", "--all", "--root", root, "--now", "2099-01-01T00:00:00Z"]) == 0
    assert "nothing due" in capsys.readouterr().out
    assert main(["schedule", "enable", "weekly", "--root", root]) == 0
    capsys.readouterr()

    # --now without --commit is a dry run: it says what would fire and claims, moves and submits nothing
    storage = Storage(root)
    weekly = load_schedule(storage, "weekly")
    first = next_fire_time(weekly.cron, weekly.tz, datetime.now(timezone.utc))
    moment = iso(first + timedelta(minutes=1))
    before = load_state(storage, weekly)
    assert main(["schedule", "tick", "weekly", "--root", root, "--now", moment]) == 0
    out, err = capsys.readouterr()
    run_id = f"cmflow-weekly-{int(first.timestamp())}"
    assert out == f"schedule weekly: run {run_id} would fire for {iso(first)}\n"
    assert "dry run" in err and "nothing submitted, no cursor moved; add --commit" in err
    assert history(storage, weekly) == [] and load_state(storage, weekly).cursor == before.cursor
    assert main(["schedule", "list", "--root", root, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["next_fire"], row["last_run"], row["last_run_status"]) == (iso(first), None, None)
    # the real tick at that time still fires (the dry run lost nothing); list then shows the next real
    # fire (after the cursor) and the last run's status from its run record
    fake = FakeSubmitter()
    assert [f.outcome for f in tick(t(moment), storage, fake)] == ["submitted"]
    assert main(["schedule", "list", "--root", root, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    after = next_fire_time(weekly.cron, weekly.tz, t(moment))
    assert row["next_fire"] == iso(after) and row["overdue_fire"] is None
    assert (row["last_run"], row["last_run_status"]) == (run_id, "submitted")  # no run record yet
    storage.write_json(f"runs/{run_id}/run.json", {"run_id": run_id, "status": "succeeded"})
    assert main(["schedule", "list", "--root", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["last_run_status"] == "succeeded"
    monkeypatch.setenv("COLUMNS", "200")  # the table, unwrapped
    assert main(["schedule", "list", "--root", root]) == 0
    assert f"{run_id} (succeeded)" in capsys.readouterr().out

    assert main(["schedule", "export", "weekly", "--kuberay", "--root", root]) == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    assert manifest["kind"] == "RayCronJob" and manifest["apiVersion"] == "ray.io/v1"
    assert manifest["spec"]["schedule"] == "0 3 * * 1" and manifest["spec"]["timeZone"] == "Europe/Paris"
    assert manifest["spec"]["concurrencyPolicy"] == "Replace"
    job = manifest["spec"]["jobTemplate"]
    assert "schedule tick weekly" in job["entrypoint"] and "--inline" in job["entrypoint"]
    assert job["rayClusterSpec"]["rayVersion"] == metadata.version("ray")  # the installed ray, not a literal
    worker = job["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["envFrom"] == [{"secretRef": {"name": "cmflow-s3"}}]  # cluster/kuberay/secrets.example.yaml
    assert main(["schedule", "tick", "--root", root]) == 2
    assert "name one schedule or pass --all" in capsys.readouterr().err
    assert main(["schedule", "delete", "weekly", "--root", root]) == 0
    assert main(["schedule", "tick", "weekly", "--root", root]) == 2
    assert "no schedule 'weekly'" in capsys.readouterr().err


def test_cli_tick_reports_an_unreachable_cluster_and_retries(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from cluster_helpers import free_port

    root = str(tmp_path / "root")
    spec = write_spec(tmp_path / "tiny.yaml", demo_spec(root))
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert (
        main(["schedule", "create", str(spec), "--cron", "*/5 * * * *", "--id", "down", "--address", address])
        == 0
    )
    capsys.readouterr()
    now = (datetime.now().astimezone() + timedelta(minutes=6)).isoformat()
    assert main(["schedule", "tick", "--all", "--root", root, "--now", now, "--commit"]) == 1
    out, err = capsys.readouterr()
    assert "failed" in out and "cannot reach the Ray job server" in out and "retried on the next tick" in err
    state = load_state(Storage(root), load_schedule(Storage(root), "down"))
    assert len(state.retry) == 1
