"""Starting or attaching Ray, checking that the cluster can place every stage, and the progress hub."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from cmflow.errors import ClusterError
from cmflow.spec import Resources

log = logging.getLogger(__name__)

#: the environment of every Ray worker of a run: OpenMP threads that sleep when idle instead of spinning
#: (a spinning pool steals the CPU from every other process on the node -- training ran 7-15x slower next
#: to another job), for GNU OpenMP (torch's CPU wheels) and Intel OpenMP alike. Each task then sizes its
#: torch threads to the CPUs it holds (:func:`cmflow.distributed.tasks.task_threads`).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}


def worker_env(threads: int) -> dict[str, str]:
    """:data:`WORKER_ENV` for a process that runs ``threads`` torch threads."""
    return {**WORKER_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _driver_runtime_env() -> dict[str, Any] | None:
    """The runtime env this driver asks for: :data:`WORKER_ENV`, unless the driver is itself a submitted Ray
    job -- `cmflow submit` already put those variables in the job's runtime env, and Ray refuses a driver
    whose runtime env names a variable the job's also sets."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return None
    return {"env_vars": dict(WORKER_ENV)}


class RayRuntime:
    """Ray for one pipeline run: a local Ray cmflow starts (and stops), or an existing cluster."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = num_cpus
        self.started_here = False
        self._remote: Any = None
        self.hub: Any = None

    def start(self) -> None:
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        with _ray_noise_filtered(), _keep_sigterm_handler():
            import ray

            if ray.is_initialized():
                pass  # inside a Ray job, or a caller's own ray.init(): use that cluster
            elif self.address:
                try:
                    ray.init(
                        address=self.address,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                        runtime_env=_driver_runtime_env(),
                    )
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise ClusterError(
                        f"cannot reach the Ray cluster at {self.address}: {exc}; check the address or drop "
                        "--address to run locally"
                    ) from None
            else:
                # A private local Ray on loopback. Token auth guards shared clusters; this one serves only
                # this process, so it is disabled explicitly (Ray 2.60 turns it on by default).
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(
                    address="local",
                    num_cpus=self.num_cpus or os.cpu_count() or 1,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    configure_logging=True,
                    runtime_env={"env_vars": dict(WORKER_ENV)},
                )
                self.started_here = True
        self.hub = _progress_hub_class().options(num_cpus=0).remote()

    def stop(self) -> None:
        if not self.started_here:
            return  # nothing to stop, and a run that never needed Ray should not pay for importing it
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.started_here = False

    def remote_stage(self) -> Any:
        """The Ray remote wrapper of :func:`cmflow.engine.worker.execute_stage`, built once."""
        if self._remote is None:
            import ray

            from cmflow.engine.worker import execute_stage

            self._remote = ray.remote(execute_stage)
        return self._remote

    def nodes(self) -> list[dict[str, float]]:
        import ray

        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]

    def check_feasible(self, demands: Iterable[tuple[str, Resources]]) -> None:
        check_feasible(self.nodes(), demands)

    def progress(self) -> dict[str, dict[str, Any]]:
        if self.hub is None:
            return {}
        import ray

        try:
            return ray.get(self.hub.snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - the display must never break a run
            return {}


#: lines Ray's C++ core writes to the driver's stderr while it starts that tell an operator nothing (on a host
#: without a default route every ``ray.init`` warns that it fell back to the hostname for its IP)
RAY_NOISE = ("Failed to determine local IP",)


@contextlib.contextmanager
def _ray_noise_filtered() -> Iterator[None]:
    """Hold the process's stderr (file descriptor 2, where Ray's C++ code writes) in a temporary file while
    Ray starts, then pass on every line except :data:`RAY_NOISE`."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (an embedding host): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if not _noise(line)]
            if kept:
                os.write(2, b"".join(kept))


def _noise(line: bytes) -> bool:
    text = line.decode(errors="replace")
    return any(pattern in text for pattern in RAY_NOISE)


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Keep this process's SIGTERM handler across ``ray.init``. Ray installs its own (a C++ handler that
    dumps a stack trace to the terminal, chained to one that exits); cmflow's driver turns SIGTERM
    (`cmflow stop`) into a clean stop that records the run as stopped."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)  # also drops the C++ handler Ray put underneath


def check_feasible(nodes: list[dict[str, float]], demands: Iterable[tuple[str, Resources]]) -> None:
    """Fail up front when no node can hold a stage's task (Ray would leave it pending forever)."""
    for stage, resources in demands:
        demand = resources.demand()
        fitting = [n for n in nodes if all(n.get(k, 0.0) >= v for k, v in demand.items())]
        if not fitting:
            have = ", ".join(
                f"{k}={_fmt(sum(n.get(k, 0.0) for n in nodes) if k != 'memory' else max(n.get(k, 0) for n in nodes))}"
                for k in demand
            )
            wanted = ", ".join(f"{k}={_fmt(v)}" for k, v in demand.items())
            fix = (
                f"set stages.{stage}.resources.gpus=0 or submit to a cluster with GPUs"
                if "GPU" in demand and not any(n.get("GPU") for n in nodes)
                else f"lower stages.{stage}.resources or use a larger cluster"
            )
            raise ClusterError(
                f"stage {stage!r} needs {wanted} per task but no node of the cluster has that "
                f"(cluster: {have or 'nothing'}); {fix}"
            )
        if resources.workers > 1:
            capacity = sum(
                int(min(n.get(k, 0.0) / v for k, v in demand.items())) if demand else resources.workers
                for n in nodes
            )
            if capacity < resources.workers:
                raise ClusterError(
                    f"stage {stage!r} wants {resources.workers} training workers of "
                    f"{', '.join(f'{k}={_fmt(v)}' for k, v in demand.items())} but the cluster fits only "
                    f"{capacity}; lower stages.{stage}.resources.workers"
                )


def _fmt(value: float) -> str:
    if value >= 2**30:
        return f"{value / 2**30:.1f}GiB"
    return f"{value:g}"


def _progress_hub_class() -> Any:
    import ray

    @ray.remote
    class ProgressHub:
        """Latest progress per stage, pushed by stage tasks and polled by the driver's display."""

        def __init__(self) -> None:
            self.state: dict[str, dict[str, Any]] = {}

        def update(self, stage: str, update: dict[str, Any]) -> None:
            entry = self.state.setdefault(stage, {})
            entry.update(update)
            entry["at"] = time.time()

        def snapshot(self) -> dict[str, dict[str, Any]]:
            return self.state

    return ProgressHub
