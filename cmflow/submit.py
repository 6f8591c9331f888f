"""Running a pipeline on a Ray cluster as a Ray job, and controlling submitted runs.

``submit_spec`` ships the validated spec as ``spec.yaml`` in the job's ``working_dir`` and the ``cmflow``
package as a ``py_modules`` entry, then submits the entrypoint
``python -m cmflow.cli.main run spec.yaml --run-id <run_id> --address auto`` through
``ray.job_submission.JobSubmissionClient`` with ``submission_id=<run_id>``: the pipeline driver runs on the
cluster (the same driver as ``cmflow run``) and writes ``runs/<run_id>/run.json`` into the storage root, so
the storage root must be reachable from the cluster (S3, or a shared filesystem).

The submitter records the run in ``runs/<run_id>/submission.json`` (job server address, submission ids,
the redacted spec), created *before* the job is submitted and create-only, so one run id is submitted once;
Ray's job server refuses a second job with the same submission id as well. ``resubmit`` (``cmflow resume``)
submits ``<run_id>-r<n>`` with the same cmflow run id: finished stages are cache hits.

Environment of the job: ``MLFLOW_TRACKING_URI``, ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL[_S3]`` and
``AWS_DEFAULT_REGION``/``AWS_REGION`` are copied from the submitter's environment when set, and so are the
credentials ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` and
``MLFLOW_TRACKING_TOKEN``/``_USERNAME``/``_PASSWORD`` unless ``forward_credentials=False`` (anyone who can
read the cluster's job list can read a runtime_env: prefer instance roles / Kubernetes secrets on the
cluster). Ray's auth settings are *not* copied: the job inherits the cluster's ``RAY_AUTH_MODE`` and token.

Token authentication (Ray >= 2.52): the token comes from ``--token-file``, else ``RAY_AUTH_TOKEN``, else the
file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; it is sent as ``Authorization: Bearer``
on every job-server request and never put into the job's environment.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from cmflow.engine.ray_runtime import WORKER_ENV
from cmflow.engine.records import RunRecord, utcnow
from cmflow.errors import ClusterError, CmflowError, InputError, SpecError, StageError, UsageError
from cmflow.redact import redact_uri
from cmflow.schedule.store import Schedule
from cmflow.schedule.tick import DuplicateSubmission
from cmflow.spec import PipelineSpec
from cmflow.storage import Storage

FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_EXPERIMENT_NAME",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
FIXED_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "PYTHONUNBUFFERED": "1", **WORKER_ENV}
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SPEC_FILE = "spec.yaml"


# --------------------------------------------------------------------------------------------------
# The cluster: address, token, client


@dataclass(frozen=True)
class ClusterTarget:
    """A Ray job server (the dashboard, ``http://HEAD:8265``) and the token to talk to it."""

    address: str
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else an http ``RAY_ADDRESS``; adds ``http://``."""
    value = address or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not value and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        value = os.environ["RAY_ADDRESS"]
    if not value:
        raise UsageError("no Ray job server given; pass --address http://HEAD:8265 (the dashboard port)")
    if "://" not in value:
        value = f"http://{value}"
    if not value.startswith(("http://", "https://")):
        raise UsageError(
            f"--address {value!r} is not a job server URL; pass the dashboard address, e.g. http://HEAD:8265"
        )
    return value.rstrip("/")


def resolve_token(
    token_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The Ray auth token: ``token_file``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    environ = os.environ if environ is None else environ
    if token_file is not None:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise UsageError(
                f"token file {str(path)!r} does not exist; pass the file holding the Ray auth token"
            )
        return path.read_text().strip() or None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise UsageError(
                f"RAY_AUTH_TOKEN_PATH names {str(path)!r}, which does not exist; fix or unset it"
            )
        return path.read_text().strip() or None
    default = Path(environ.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    return (default.read_text().strip() or None) if default.is_file() else None


def target_for(address: str | None, token_file: str | Path | None = None) -> ClusterTarget:
    return ClusterTarget(resolve_address(address), resolve_token(token_file))


def _ray_error(exc: BaseException, target: ClusterTarget, what: str) -> CmflowError:
    """Map a job-server failure to one line naming the fix."""
    text = str(exc)
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return ClusterError(
            f"cannot reach the Ray job server at {target.address} to {what}; check --address "
            "(http://HEAD:8265, the dashboard port) and that the cluster is up"
        )
    if "401" in text or "Authentication required" in text or "Unauthorized" in text:
        return ClusterError(
            f"the Ray cluster at {target.address} requires a token to {what}; set RAY_AUTH_TOKEN or pass "
            "--token-file (the cluster's ~/.ray/auth_token)"
        )
    if "403" in text or "Forbidden" in text or "invalid or incorrect" in text:
        return ClusterError(
            f"the Ray cluster at {target.address} rejected the token to {what}; use the cluster's current token"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ClusterError(f"the Ray job server at {target.address} failed to {what}: {first[:300]}")


def job_client(target: ClusterTarget) -> Any:
    """A ``JobSubmissionClient`` for ``target`` (the connection is checked here)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(target.address, headers=target.headers())
    except Exception as exc:  # noqa: BLE001 - connection / auth failures have many types
        raise _ray_error(exc, target, "connect") from None


# --------------------------------------------------------------------------------------------------
# What the job carries


def package_dir() -> Path:
    """The directory of the installed ``cmflow`` package (shipped as a ``py_modules`` entry)."""
    import cmflow

    return Path(cmflow.__file__).resolve().parent


def build_runtime_env(
    working_dir: str | Path | None,
    *,
    ship_code: bool = True,
    environ: Mapping[str, str] | None = None,
    forward_credentials: bool = True,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A runtime_env: the spec folder as working_dir (if any), the package, and the forwarded env vars."""
    environ = os.environ if environ is None else environ
    names = FORWARD_ENV + (CREDENTIAL_ENV if forward_credentials else ())
    env_vars = {**FIXED_ENV, **{n: environ[n] for n in names if environ.get(n)}, **dict(extra_env or {})}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
    if working_dir is not None or ship_code:
        runtime_env["excludes"] = ["__pycache__", "*.pyc", ".pytest_cache"]
    if ship_code:
        runtime_env["py_modules"] = [str(package_dir())]
    return runtime_env


def entrypoint_command(run_id: str, python: str = "python") -> str:
    """The shell command the job runs: the same pipeline driver as ``cmflow run``."""
    return f"{shlex.quote(python)} -m cmflow.cli.main run {SPEC_FILE} --run-id {shlex.quote(run_id)} --address auto"


def parse_env(items: list[str] | None) -> dict[str, str]:
    """``--env KEY=VALUE`` items -> dict."""
    env: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--env {item!r} is not KEY=VALUE; write e.g. --env HF_HOME=/cache")
        env[key.strip()] = value
    return env


def check_root_reachable(spec: PipelineSpec, address: str, *, allow_local_root: bool = False) -> None:
    """A local storage root works only for a cluster on this machine (or a shared filesystem)."""
    root = spec.storage.root
    local = "://" not in root or root.startswith("file://")
    host = (urlparse(address).hostname or "").lower()
    if local and host not in LOOPBACK and not allow_local_root:
        raise UsageError(
            f"storage.root {root!r} is a local path, which the cluster at {address} cannot see; use an s3:// "
            "root (--set storage.root=s3://bucket/cmflow) or pass --allow-local-root for a shared filesystem"
        )
    if root.startswith("memory://"):
        raise UsageError(
            "storage.root memory:// lives in one process; use an s3:// root to submit to a cluster"
        )


def check_reachable(spec: PipelineSpec, environ: Mapping[str, str] | None = None) -> None:
    """Before a submit: the storage root answers from here, and tracking can work on a cluster.

    Tracking resolves as everywhere (:func:`cmflow.mlflow_client.resolve_tracking_uri`: ``tracking.uri``,
    then ``MLFLOW_TRACKING_URI``, then the local default); a local store (SQLite, a path) under a remote
    root is refused, and an http(s) server must answer ``/health``.
    """
    from cmflow.mlflow_client import resolve_tracking_uri

    environ = os.environ if environ is None else environ
    storage = Storage(spec.storage.root, spec.storage.options, retries=1)
    try:
        storage.list("runs")
    except CmflowError as exc:
        raise InputError(
            f"storage.root {redact_uri(spec.storage.root)} is not reachable from here ({_first_line(exc)}); "
            "check storage.root, storage.options (endpoint_url) and the credentials, then submit again"
        ) from None
    except Exception as exc:  # noqa: BLE001 - endpoint, DNS, bucket problems surface as many types
        raise InputError(
            f"storage.root {redact_uri(spec.storage.root)} is not reachable from here "
            f"({type(exc).__name__}: {_first_line(exc)}); check storage.root, storage.options (endpoint_url) "
            "and the credentials, then submit again"
        ) from None
    if not spec.tracking.enabled:
        return
    remote_root = "://" in spec.storage.root and not spec.storage.root.startswith("file://")
    configured = spec.tracking.uri or environ.get("MLFLOW_TRACKING_URI") or None
    fix = "set tracking.uri or MLFLOW_TRACKING_URI to an MLflow server (or tracking.enabled: false)"
    if configured is None and remote_root:
        raise SpecError(f"storage.root {redact_uri(spec.storage.root)} is not local, so {fix}")
    uri = configured or resolve_tracking_uri(None, spec.storage.root)
    scheme = urlparse(uri).scheme if "://" in uri else "file"
    if scheme in {"sqlite", "file"} and remote_root:
        raise SpecError(
            f"tracking {redact_uri(uri)} is a local store the cluster's nodes cannot share; {fix}"
        )
    if scheme in {"http", "https"}:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):  # noqa: S310 - http(s) only
                pass
        except Exception as exc:  # noqa: BLE001 - refused, DNS, timeouts, HTTP errors
            raise InputError(
                f"MLflow tracking at {redact_uri(uri)} is not reachable from here ({_first_line(exc)}); start "
                "the server or fix tracking.uri / MLFLOW_TRACKING_URI, then submit again"
            ) from None


def _first_line(exc: BaseException) -> str:
    text = redact_uri(str(exc)).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# The submission index: runs/<run_id>/submission.json


@dataclass
class Submission:
    """Where a run was submitted and under which submission ids (the latest one is current)."""

    run_id: str
    address: str
    pipeline: str
    spec: dict[str, Any]  # redacted snapshot (what resume resubmits)
    entrypoint: str
    submissions: list[dict[str, str]] = field(default_factory=list)  # [{"id", "at"}]
    metadata: dict[str, str] = field(default_factory=dict)
    state: str = "submitting"  # submitting | submitted
    created_at: str = field(default_factory=utcnow)

    @property
    def current(self) -> str:
        return self.submissions[-1]["id"] if self.submissions else self.run_id

    @staticmethod
    def key(run_id: str) -> str:
        return f"runs/{run_id}/submission.json"

    def save(self, storage: Storage, *, create_only: bool = False) -> None:
        storage.write_json(self.key(self.run_id), asdict(self), create_only=create_only)


def load_submission(storage: Storage, run_id: str) -> Submission | None:
    """The submission record of ``run_id``, or None for runs that were not submitted to a cluster."""
    from cmflow.engine.records import check_run_id

    check_run_id(run_id)
    try:
        data = storage.read_json(Submission.key(run_id))
    except FileNotFoundError:
        return None
    known = set(Submission.__dataclass_fields__)
    return Submission(**{k: v for k, v in data.items() if k in known})


def require_submission(storage: Storage, run_id: str) -> Submission:
    sub = load_submission(storage, run_id)
    if sub is None:
        raise UsageError(
            f"run {run_id!r} was not submitted to a cluster from {storage.uri()}; pass --root with the "
            "run's storage root (or see `cmflow status` for local runs)"
        )
    return sub


# --------------------------------------------------------------------------------------------------
# Submit, resubmit, inspect, stop


#: waits before resubmitting when a freshly started head has no job agent yet (HTTP 500 "No available agent")
AGENT_WAITS_S = (1.0, 2.0, 4.0, 8.0, 15.0)


def _submit_job(
    client: Any,
    target: ClusterTarget,
    *,
    spec_data: dict[str, Any],
    submission_id: str,
    entrypoint: str,
    runtime_options: dict[str, Any],
    metadata: dict[str, str],
    entrypoint_num_cpus: float | None,
) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cmflow-submit-"))
    try:
        (workdir / SPEC_FILE).write_text(yaml.safe_dump(spec_data, sort_keys=False))
        runtime_env = build_runtime_env(workdir, **runtime_options)
        try:
            for wait_s in (*AGENT_WAITS_S, None):
                try:
                    client.submit_job(
                        entrypoint=entrypoint,
                        submission_id=submission_id,
                        runtime_env=runtime_env,
                        metadata=metadata,
                        entrypoint_num_cpus=entrypoint_num_cpus,
                    )
                    break
                except Exception as exc:  # noqa: BLE001 - only the head's "agent not up yet" is retried
                    if wait_s is None or "No available agent" not in str(exc):
                        raise
                    time.sleep(wait_s)  # a head that just started: its job agent registers within seconds
        except Exception as exc:  # noqa: BLE001 - classified below
            if "already exists" in str(exc):
                raise DuplicateSubmission(
                    f"the cluster at {target.address} already has a job {submission_id!r}; pick another --run-id "
                    f"or see `cmflow status {submission_id}`"
                ) from None
            raise _ray_error(exc, target, f"submit {submission_id}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def submit_spec(
    spec: PipelineSpec,
    target: ClusterTarget,
    *,
    run_id: str | None = None,
    ship_code: bool = True,
    python: str = "python",
    extra_env: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    forward_credentials: bool = True,
    allow_local_root: bool = False,
    entrypoint_num_cpus: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> Submission:
    """Submit a validated spec as a Ray job whose submission id is the run id; refuse a known run id."""
    from cmflow.engine.records import check_run_id, new_run_id

    run_id = check_run_id(run_id) if run_id else new_run_id(spec.name)
    check_root_reachable(spec, target.address, allow_local_root=allow_local_root)
    check_reachable(spec, environ)
    storage = Storage(spec.storage.root, spec.storage.options)
    if storage.exists(f"runs/{run_id}/run.json") and load_submission(storage, run_id) is None:
        raise DuplicateSubmission(
            f"run {run_id!r} already exists under {storage.uri()} (a local run); resume it with "
            f"`cmflow resume {run_id}` or pick another --run-id"
        )
    client = job_client(target)
    entrypoint = entrypoint_command(run_id, python)
    sub = Submission(
        run_id=run_id,
        address=target.address,
        pipeline=spec.name,
        spec=spec.redacted(),
        entrypoint=entrypoint,
        metadata={
            "cmflow_run_id": run_id,
            "cmflow_pipeline": spec.name,
            "cmflow_root": redact_uri(storage.uri()),
            **dict(metadata or {}),
        },
    )
    try:
        sub.save(storage, create_only=True)  # claims the run id before anything reaches the cluster
    except FileExistsError:
        previous = load_submission(storage, run_id)
        where = previous.address if previous else "a cluster"
        raise DuplicateSubmission(
            f"run {run_id!r} was already submitted to {where}; see `cmflow status {run_id}`, or resubmit it "
            f"with `cmflow resume {run_id}`"
        ) from None
    try:
        _submit_job(
            client,
            target,
            spec_data=spec.model_dump(mode="json"),
            submission_id=run_id,
            entrypoint=entrypoint,
            runtime_options={
                "ship_code": ship_code,
                "environ": environ,
                "forward_credentials": forward_credentials,
                "extra_env": extra_env,
            },
            metadata=sub.metadata,
            entrypoint_num_cpus=entrypoint_num_cpus,
        )
    except DuplicateSubmission:
        if not _adopt_existing(client, sub, storage):
            storage.delete(Submission.key(run_id))
        raise
    except BaseException:
        storage.delete(Submission.key(run_id))
        raise
    sub.submissions.append({"id": run_id, "at": utcnow()})
    sub.state = "submitted"
    sub.save(storage)
    return sub


def _adopt_existing(client: Any, sub: Submission, storage: Storage) -> bool:
    """Keep the index when the cluster's job of that id is this very run (a lost reply, a retried tick)."""
    try:
        info = client.get_job_info(sub.run_id)
    except Exception:  # noqa: BLE001
        return False
    metadata = info.metadata or {}
    if any(
        metadata.get(k) != sub.metadata.get(k) for k in ("cmflow_run_id", "cmflow_pipeline", "cmflow_root")
    ):
        return False
    sub.submissions.append({"id": sub.run_id, "at": utcnow()})
    sub.state = "submitted"
    sub.save(storage)
    return True


def resubmit(
    storage: Storage,
    run_id: str,
    *,
    overrides: list[str] | None = None,
    token: str | None = None,
    ship_code: bool = True,
    python: str = "python",
    forward_credentials: bool = True,
) -> Submission:
    """``cmflow resume`` of a submitted run: a new job ``<run_id>-r<n>`` running the same cmflow run id."""
    from cmflow.spec import apply_overrides
    from cmflow.validate import validate_spec

    sub = require_submission(storage, run_id)
    target = ClusterTarget(sub.address, token)
    status = job_status(sub, target)
    if status in {"PENDING", "RUNNING"}:
        raise UsageError(
            f"run {run_id} is still {status} on {sub.address}; stop it first with `cmflow stop {run_id}`"
        )
    spec = validate_spec(apply_overrides(sub.spec, overrides or []), source=f"run {run_id}")
    check_reachable(spec)
    submission_id = f"{run_id}-r{len(sub.submissions)}"
    client = job_client(target)
    _submit_job(
        client,
        target,
        spec_data=spec.model_dump(mode="json"),
        submission_id=submission_id,
        entrypoint=entrypoint_command(run_id, python),
        runtime_options={"ship_code": ship_code, "forward_credentials": forward_credentials},
        metadata={**sub.metadata, "cmflow_resubmission": submission_id},
        entrypoint_num_cpus=None,
    )
    sub.submissions.append({"id": submission_id, "at": utcnow()})
    sub.state = "submitted"
    sub.save(storage)
    return sub


def job_status(sub: Submission, target: ClusterTarget) -> str:
    """The Ray job status of the current submission: PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED | UNKNOWN."""
    if sub.state != "submitted":
        return "SUBMITTING"
    client = job_client(target)
    try:
        return str(client.get_job_status(sub.current).value)
    except Exception as exc:  # noqa: BLE001
        if "does not exist" in str(exc) or "404" in str(exc):
            return "UNKNOWN"
        raise _ray_error(exc, target, f"get the status of {sub.current}") from None


def job_info(sub: Submission, target: ClusterTarget) -> dict[str, Any]:
    """Status, message, start/end times and entrypoint of the current job (empty when the cluster lost it)."""
    client = job_client(target)
    try:
        info = client.get_job_info(sub.current)
    except Exception as exc:  # noqa: BLE001
        if "does not exist" in str(exc) or "404" in str(exc):
            return {}
        raise _ray_error(exc, target, f"get {sub.current}") from None
    return {
        "submission_id": sub.current,
        "status": str(info.status.value),
        "message": info.message or "",
        "start_time": info.start_time,
        "end_time": info.end_time,
        "entrypoint": info.entrypoint,
    }


def reconcile(record: RunRecord, job: Mapping[str, Any]) -> RunRecord:
    """The run record as Ray's job state makes it true (read side only; the driver stays its one writer).

    * Ray says FAILED while the record says running: the driver died; the run reads ``failed`` with Ray's
      reason, its running stages ``failed``, its pending ones ``skipped``.
    * Ray says STOPPED (``cmflow stop``) and the record did not succeed: the run reads ``stopped``, whatever
      the driver managed to write while it was being stopped.
    * anything else (running, succeeded, Ray unreachable or without the job): the record as written.
    """
    import copy

    status = str(job.get("status", ""))
    if status == "FAILED" and record.status == "running":
        reason = (str(job.get("message") or "").strip().splitlines() or ["no reason given"])[0][:300]
        record = copy.deepcopy(record)
        record.status = "failed"
        record.error = f"the driver died (Ray job {job.get('submission_id', '')} FAILED: {reason})"
        for srec in record.stages.values():
            if srec.status == "running":
                srec.status, srec.error = "failed", "the driver died"
            elif srec.status == "pending":
                srec.status, srec.reason = "skipped", "the driver died"
        return record
    if status == "STOPPED" and record.status != "succeeded":
        record = copy.deepcopy(record)
        record.status = "stopped"
        record.error = f"stopped with `cmflow stop`; resume with `cmflow resume {record.run_id}`"
        for srec in record.stages.values():
            interrupted = srec.error == "the driver stopped"  # what drivers before this change wrote
            if srec.status == "running" or interrupted:
                srec.status, srec.error, srec.reason = "stopped", "", "the run was stopped"
            elif srec.status == "pending":
                srec.status, srec.reason = "skipped", "the run was stopped"
        return record
    return record


def ray_job(sub: Submission, token: str | None = None) -> dict[str, Any]:
    """Ray's view of a submitted run's current job, never raising: UNAVAILABLE (with why) when the job
    server does not answer, UNKNOWN when it has no such job, SUBMITTING before it was submitted."""
    if sub.state != "submitted":
        return {"submission_id": sub.current, "status": "SUBMITTING", "message": "not submitted yet"}
    try:
        info = job_info(sub, ClusterTarget(sub.address, token))
    except ClusterError as exc:
        return {"submission_id": sub.current, "status": "UNAVAILABLE", "message": str(exc)}
    return info or {
        "submission_id": sub.current,
        "status": "UNKNOWN",
        "message": "the cluster has no such job",
    }


def stop_job(sub: Submission, target: ClusterTarget) -> bool:
    """Ask the cluster to stop the current job; False when it had already finished."""
    client = job_client(target)
    try:
        return bool(client.stop_job(sub.current))
    except Exception as exc:  # noqa: BLE001
        raise _ray_error(exc, target, f"stop {sub.current}") from None


def job_logs(sub: Submission, target: ClusterTarget) -> str:
    client = job_client(target)
    try:
        return str(client.get_job_logs(sub.current))
    except Exception as exc:  # noqa: BLE001
        raise _ray_error(exc, target, f"get the logs of {sub.current}") from None


def follow_logs(sub: Submission, target: ClusterTarget, write: Callable[[str], None]) -> None:
    """Stream the current job's logs until the job ends."""
    client = job_client(target)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sub.current):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001
        raise _ray_error(exc, target, f"follow the logs of {sub.current}") from None


def wait_for(
    sub: Submission, target: ClusterTarget, *, poll_s: float = 1.0, timeout_s: float | None = None
) -> str:
    """Poll until the current job reaches SUCCEEDED, FAILED or STOPPED; returns that status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = job_status(sub, target)
        if status in TERMINAL or status == "UNKNOWN":
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise StageError(
                f"run {sub.run_id} is still {status} after {timeout_s:g}s; see `cmflow logs {sub.run_id}`"
            )
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------------
# Submitters for schedules (cmflow.schedule.tick.Submitter)


def _schedule_spec(schedule: Schedule) -> PipelineSpec:
    from cmflow.validate import validate_spec

    return validate_spec(schedule.spec, source=f"schedule {schedule.id}")


class RayJobSubmitter:
    """Fires schedules as Ray jobs on the schedule's job server (or ``address`` when given)."""

    def __init__(
        self, address: str | None = None, token: str | None = None, *, ship_code: bool = True
    ) -> None:
        self.address = address
        self.token = token
        self.ship_code = ship_code

    def _target(self, schedule: Schedule) -> ClusterTarget:
        address = self.address or schedule.address
        if not address:
            raise UsageError(
                f"schedule {schedule.id!r} has no job server address; re-create it with --address or pass "
                "--address to the tick"
            )
        return ClusterTarget(resolve_address(address), self.token)

    def submit(self, schedule: Schedule, run_id: str, metadata: dict[str, str]) -> None:
        submit_spec(
            _schedule_spec(schedule),
            self._target(schedule),
            run_id=run_id,
            metadata=metadata,
            ship_code=self.ship_code,
        )

    def status(self, schedule: Schedule, run_id: str) -> str | None:
        spec = _schedule_spec(schedule)
        sub = load_submission(Storage(spec.storage.root, spec.storage.options), run_id)
        if sub is None:
            return None
        return job_status(sub, ClusterTarget(sub.address, self.token))

    def stop(self, schedule: Schedule, run_id: str) -> None:
        spec = _schedule_spec(schedule)
        sub = load_submission(Storage(spec.storage.root, spec.storage.options), run_id)
        if sub is not None:
            stop_job(sub, ClusterTarget(sub.address, self.token))


class InlineSubmitter:
    """Fires schedules by running the pipeline in this process (a RayCronJob's job, ``tick --inline``)."""

    def __init__(self, address: str | None = "auto") -> None:
        self.address = address

    def submit(self, schedule: Schedule, run_id: str, metadata: dict[str, str]) -> None:
        from cmflow.engine import run_pipeline

        record = run_pipeline(_schedule_spec(schedule), run_id=run_id, address=self.address)
        if record.status != "succeeded":
            raise StageError(f"scheduled run {run_id} {record.status}: {record.error}")

    def status(self, schedule: Schedule, run_id: str) -> str | None:
        from cmflow.engine.records import RunRecord

        spec = _schedule_spec(schedule)
        try:
            record = RunRecord.load(Storage(spec.storage.root, spec.storage.options), run_id)
        except UsageError:
            return None
        return {"running": "RUNNING", "succeeded": "SUCCEEDED", "failed": "FAILED"}.get(
            record.status, "STOPPED"
        )

    def stop(self, schedule: Schedule, run_id: str) -> None:
        raise UsageError(
            f"schedule {schedule.id!r}: an inline tick cannot stop run {run_id}; use concurrency forbid or allow"
        )
