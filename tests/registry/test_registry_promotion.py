"""register / promote stages and the registry against a real ``mlflow server`` (artifacts proxied to S3)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from registry_helpers import run_task, unique

from cmflow import registry
from cmflow.cli.main import main
from cmflow.errors import RegistryError
from cmflow.mlflow_client import client_for
from cmflow.storage import Manifest, Storage


def promote(storage: Storage, server: str, registered: Manifest, **params: Any) -> dict[str, Any]:
    manifest = run_task(storage, "promote", {"tracking_uri": server, **params}, {"registered": registered})
    return json.loads(storage.read_artifact_file(manifest, "promotion.json"))


def registered_artifact(
    storage: Storage, server: str, name: str, model: Manifest, report: Manifest, **gate: Any
) -> Manifest:
    inputs = {"model": model, "report": report}
    params = {"model_name": name, "tracking_uri": server, "gate": gate}
    return run_task(storage, "register", params, inputs)


def test_register_tags_and_gated_promotion(
    storage: Storage,
    mlflow_server: str,
    model_artifact: Callable[..., Manifest],
    report_artifact: Callable[..., Manifest],
) -> None:
    name = unique("cm")
    client = client_for(mlflow_server)
    model = model_artifact(seed=1)
    gate = {"max_fid": 50.0, "tolerance": 0.1}
    first = registered_artifact(storage, mlflow_server, name, model, report_artifact(20.0), **gate)
    info = json.loads(storage.read_artifact_file(first, "registered.json"))
    assert info["version"] == "1" and info["model_uri"] == f"models:/{name}/1"
    mv = client.get_model_version_by_alias(name, "challenger")
    assert mv.version == "1"
    tags = mv.tags
    assert tags["fid_1step"] == "20.0" and tags["fid_teacher"] == "3.0" and tags["nfe_1step"] == "1.0"
    assert tags["cmflow.ref_stats_digest"] == "ref-digest-a"
    assert tags["cmflow.model_digest"] == model.digest
    assert tags["cmflow.validation_status"] == "pending"
    assert json.loads(tags["cmflow.gate"]) == {"metric": "fid_1step", "max_fid": 50.0, "tolerance": 0.1}
    assert tags["cmflow.cache_key"] and tags["cmflow.run_id"].startswith("test-run")
    assert client.get_run(tags["cmflow.stage_run_id"]).info.status == "FINISHED"

    # the first promotion: no champion yet
    result = promote(storage, mlflow_server, first)
    assert result["outcome"] == "promoted" and result["champion_after"] == "1"
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    # a worse challenger is refused and the champion stays
    worse = registered_artifact(
        storage, mlflow_server, name, model_artifact(seed=2), report_artifact(25.0), **gate
    )
    result = promote(storage, mlflow_server, worse)
    assert result["outcome"] == "rejected" and "> champion v1" in result["message"]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version(name, "2").tags["cmflow.validation_status"] == "failed"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"

    # a better one is promoted and records the previous champion
    better = registered_artifact(
        storage, mlflow_server, name, model_artifact(seed=3), report_artifact(15.0), **gate
    )
    result = promote(storage, mlflow_server, better)
    assert result["outcome"] == "promoted" and (result["champion_before"], result["champion_after"]) == (
        "1",
        "3",
    )
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "3" and champion.tags["cmflow.previous_champion"] == "1"
    assert champion.tags["cmflow.validation_status"] == "passed"
    assert json.loads(champion.tags["cmflow.gate_report"])["action"] == "promote"

    # manual policy: the gate passes but the alias stays
    best = registered_artifact(storage, mlflow_server, name, model_artifact(seed=4), report_artifact(10.0))
    assert promote(storage, mlflow_server, best, policy="manual")["outcome"] == "held"
    assert client.get_model_version_by_alias(name, "champion").version == "3"

    # rollback restores the previous champion (twice walks the history back)
    assert registry.rollback(client, name).champion_after == "1"
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(client, name)
    assert name in [m.name for m in registry.list_models(client)]
    assert all(".cmflow-lock." not in m.name for m in registry.list_models(client))


def test_register_is_idempotent_per_cache_key(
    storage: Storage, mlflow_server: str, model_artifact: Callable[..., Manifest]
) -> None:
    """A retried register task (same cache key) reuses its version instead of registering a duplicate."""
    name = unique("cm")
    client = client_for(mlflow_server)
    run = client.create_run(registry_experiment(client))
    model = model_artifact()
    kwargs = dict(
        name=name,
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        weights=storage.local_artifact_file(model, "model.safetensors"),
        config=storage.local_artifact_file(model, "model.json"),
        tags={"cmflow.cache_key": "k1"},
    )
    first = registry.register_version(client, **kwargs)
    again = registry.register_version(client, **kwargs)
    assert first.version == again.version == "1"
    assert len(registry.versions(client, name)) == 1


def registry_experiment(client: Any) -> str:
    from cmflow.mlflow_client import experiment_id

    return experiment_id(client, "cmflow-registry-tests")


class _BarrierClient:
    """Delegates to a real client, but every ticket creation waits until all promoters reach it.

    That forces the worst interleaving: every promoter has read (and re-read) the same champion before
    any of them moves it.
    """

    def __init__(self, client: Any, barrier: threading.Barrier) -> None:
        self._client = client
        self._barrier = barrier

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._client, attr)
        if attr != "create_registered_model":
            return value

        def create(name: str, *args: Any, **kwargs: Any) -> Any:
            if ".cmflow-lock." in name:
                self._barrier.wait(timeout=60)
            return value(name, *args, **kwargs)

        return create


def test_concurrent_promotions_have_exactly_one_winner(
    storage: Storage,
    mlflow_server: str,
    model_artifact: Callable[..., Manifest],
    report_artifact: Callable[..., Manifest],
) -> None:
    name = unique("cm")
    client = client_for(mlflow_server)
    first = registered_artifact(storage, mlflow_server, name, model_artifact(seed=0), report_artifact(30.0))
    assert promote(storage, mlflow_server, first)["outcome"] == "promoted"
    versions = []
    for seed, fid in ((1, 20.0), (2, 19.0), (3, 18.0)):
        art = registered_artifact(
            storage, mlflow_server, name, model_artifact(seed=seed), report_artifact(fid)
        )
        versions.append(json.loads(storage.read_artifact_file(art, "registered.json"))["version"])

    barrier = threading.Barrier(len(versions))
    results: dict[str, registry.Promotion] = {}
    errors: list[BaseException] = []

    def attempt(version: str) -> None:
        try:
            own = _BarrierClient(client_for(mlflow_server), barrier)
            results[version] = registry.promote(own, name, version)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    outcomes = sorted(r.outcome for r in results.values())
    assert outcomes == ["lost_race", "lost_race", "promoted"], {v: r.message for v, r in results.items()}
    (winner,) = [v for v, r in results.items() if r.outcome == "promoted"]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == winner and champion.tags["cmflow.previous_champion"] == "1"
    for version, result in results.items():
        if version != winner:
            assert "another promoter" in result.message
            assert "cmflow.previous_champion" not in client.get_model_version(name, version).tags
    # the losers can simply run promote again: now they are judged against the new champion
    retry = {v: registry.promote(client, name, v).outcome for v in versions if v != winner}
    assert set(retry.values()) <= {"promoted", "rejected"}


def test_unfinished_move_is_rolled_forward(
    storage: Storage,
    mlflow_server: str,
    model_artifact: Callable[..., Manifest],
    report_artifact: Callable[..., Manifest],
) -> None:
    """A promoter that died after taking its ticket does not block promotion forever."""
    name = unique("cm")
    client = client_for(mlflow_server)
    for seed, fid in ((0, 30.0), (1, 20.0), (2, 10.0)):
        registered_artifact(storage, mlflow_server, name, model_artifact(seed=seed), report_artifact(fid))
    assert registry.promote(client, name, "1").outcome == "promoted"
    # simulate a winner that died between the ticket (generation 2, to v2) and the alias move
    client.create_registered_model(
        registry.ticket_name(name, "champion", 2),
        tags={registry.TICKET_TAG: name, "cmflow.to": "2", "cmflow.action": "promote"},
    )
    blocked = registry.promote(client, name, "3")
    assert (
        blocked.outcome == "lost_race" and client.get_model_version_by_alias(name, "champion").version == "1"
    )
    recovered = registry.promote(client, name, "3", stale_after_s=0.0)
    assert recovered.outcome == "lost_race" and "rolled forward" in recovered.message
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert registry.promote(client, name, "3").outcome == "promoted"
    assert client.get_model_version(name, "3").tags["cmflow.previous_champion"] == "2"


def test_models_cli(
    storage: Storage,
    mlflow_server: str,
    model_artifact: Callable[..., Manifest],
    report_artifact: Callable[..., Manifest],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI applies the gate the version was registered under; --force needs a reason, tags 'forced'."""
    name = unique("cm")
    client = client_for(mlflow_server)
    for seed, fid in ((0, 20.0), (1, 40.0)):
        registered_artifact(
            storage, mlflow_server, name, model_artifact(seed=seed), report_artifact(fid), max_fid=30.0
        )
    uri = ["--tracking-uri", mlflow_server]
    assert main(["models", "promote", name, "--version", "1", *uri]) == 0
    capsys.readouterr()
    # v2 (FID 40) fails its registered gate max_fid 30: no CLI flag is needed for the CLI to apply it
    assert main(["models", "promote", name, "--version", "2", *uri]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "fid_1step 40 > max_fid 30" in err
    assert f'; to promote it anyway: `cmflow models promote {name} --version 2 --force --reason "..."`' in err
    assert client.get_model_version(name, "2").tags["cmflow.validation_status"] == "failed"
    # a looser gate on the command line does not replace the recorded one
    assert main(["models", "promote", name, "--version", "2", "--max-fid", "100", *uri]) == 2
    assert "registered under the gate fid_1step <= 30" in capsys.readouterr().err
    assert main(["models", "promote", name, "--version", "2", "--force", *uri]) == 2
    assert "--force needs a reason" in capsys.readouterr().err
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert main(["models", "promote", name, "--version", "2", "--force", "--reason", "hotfix", *uri]) == 0
    assert "v1 -> v2 (forced: hotfix" in capsys.readouterr().out
    tags = client.get_model_version(name, "2").tags
    assert tags["cmflow.validation_status"] == "forced" and tags["cmflow.forced_reason"] == "hotfix"
    assert json.loads(tags["cmflow.gate_report"])["forced"] is True
    assert main(["models", "describe", name, "--json", *uri]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["aliases"]["champion"] == "2"
    assert main(["models", "rollback", name, *uri]) == 0
    assert "v2 -> v1" in capsys.readouterr().out
    assert main(["models", "list", *uri]) == 0
    assert name in capsys.readouterr().out
    assert main(["models", "describe", "no-such-model", *uri]) == 2
    assert "no registered model" in capsys.readouterr().err
