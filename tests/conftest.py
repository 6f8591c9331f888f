"""Shared fixtures: real services on 127.0.0.1, started and stopped by their own handles.

Run the suite inside a loopback-only network namespace (``bash .ci/pytest``), because Ray binds every
interface. Nothing here calls ``ray stop``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Explicit settings for every Ray this suite starts (Ray 2.60 turns token auth on by default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default, so every short training run ends up to
# 2 s after its workers do; polling at 0.25 s takes that off each of the suite's ~40 Ray Train runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("RAY_ADDRESS", None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's server) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url  # botocore, s3fs and pyarrow (Ray Train) all read it
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = url
    yield url
    server.stop()
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous


@pytest.fixture()
def s3_root(moto_endpoint: str) -> tuple[str, dict[str, str]]:
    """A fresh bucket: returns (``s3://bucket/cmflow``, storage options)."""
    import s3fs

    bucket = f"cmflow-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)
    return f"s3://{bucket}/cmflow", {"endpoint_url": moto_endpoint}


@pytest.fixture(scope="session")
def _ray_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The local Ray's temp dir; at the end of the session, whatever Ray this process is connected to goes."""
    import ray

    yield str(tmp_path_factory.mktemp("ray"))
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture()
def ray_session(moto_endpoint: str, _ray_temp_dir: str) -> None:
    """A local Ray (2 CPUs) shared by the session; the engine reuses it instead of starting its own.

    Started on first use and kept; started again if a test in between connected this process to another
    cluster (tests/cluster does, and shuts its cluster down), so test order does not matter.
    """
    ensure_local_ray(_ray_temp_dir)


@pytest.fixture(scope="module")
def ray_module(moto_endpoint: str, _ray_temp_dir: str) -> None:
    """:func:`ray_session` for module-scoped fixtures (a teacher trained once per module)."""
    ensure_local_ray(_ray_temp_dir)


def ensure_local_ray(temp_dir: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            log_to_driver=False,
            logging_level="WARNING",
        )


@pytest.fixture(scope="session")
def mlflow_server(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, artifacts proxied to the moto S3 bucket)."""
    import s3fs

    bucket = "mlflow-artifacts"
    s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True).mkdir(bucket)
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": moto_endpoint}
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{home}/mlflow.db",
            "--artifacts-destination",
            f"s3://{bucket}/mlflow",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.close()
            raise RuntimeError(f"mlflow server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()
