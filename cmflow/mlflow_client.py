"""MLflow clients and the one place a tracking URI is resolved.

Every caller -- the pipeline's tracking, the ``register`` / ``promote`` stages, ``cmflow models``,
``cmflow sample`` and ``submit`` -- resolves the MLflow URI in the same order:

1. the configured URI (the spec's ``tracking.uri``, a stage's ``tracking_uri`` param, ``--tracking-uri``);
2. ``$MLFLOW_TRACKING_URI``;
3. the SQLite store ``<root>/mlflow.db`` of a local storage root (``$CMFLOW_ROOT`` or ./cmflow-artifacts
   when no root is given).

A remote (s3://) root has no local default: without 1 or 2 that is a one-line error naming the fix.
Clients are explicit ``MlflowClient`` objects whose tracking and registry URIs are both the resolved URI; no
process-global tracking URI and no fluent active run are used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cmflow.errors import SpecError
from cmflow.redact import redact_uri
from cmflow.spec import default_root

__all__ = ["client_for", "experiment_id", "resolve_tracking_uri", "sqlite_uri_for_root"]


def sqlite_uri_for_root(root: str) -> str:
    """The default tracking store of a local storage root: ``sqlite:////abs/root/mlflow.db``."""
    if root.startswith("file://"):
        root = root[len("file://") :]
    if "://" in root:
        raise SpecError(
            f"storage root {redact_uri(root)} is not local, so tracking needs an MLflow server: set "
            "tracking.uri (e.g. http://mlflow:5000), MLFLOW_TRACKING_URI, or tracking.enabled: false"
        )
    path = Path(os.path.expanduser(root)).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None = None, root: str | None = None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else SQLite under the (local) storage root."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return sqlite_uri_for_root(root or default_root())


def client_for(tracking_uri: str | None = None, root: str | None = None) -> Any:
    """An ``MlflowClient`` whose tracking and registry URIs are both :func:`resolve_tracking_uri`'s answer."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri, root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (or restored) if needed; safe against concurrent creation.

    A new experiment on a SQLite store keeps its artifacts beside the database file (``mlflow-artifacts/``)
    unless ``artifact_location`` says otherwise -- never in MLflow's default ``./mlruns`` under the cwd.
    """
    from mlflow.exceptions import MlflowException

    if artifact_location is None:
        artifact_location = _beside_sqlite(str(getattr(client, "tracking_uri", "")))
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def _beside_sqlite(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlflow-artifacts").as_uri()
