"""The scheduler: a detached, named Ray actor that calls :func:`cmflow.schedule.tick.tick` every ``interval_s``.

``start`` creates (or finds: ``get_if_exists=True``) the actor ``cmflow-scheduler`` in namespace ``cmflow``
with ``lifetime="detached"``, ``max_restarts=-1`` and ``num_cpus=0``. It keeps no state of its own: every
tick reads the schedules, their state and their markers from the storage root, so a restarted actor (Ray
re-runs its constructor with the same arguments) carries on where the old one stopped, and a second
scheduler, or a Kubernetes CronJob running ``cmflow schedule tick --all``, cannot make a fire happen twice.
It lives as long as the Ray cluster (use GCS fault tolerance, or start it from the head's start commands).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

from cmflow.errors import ClusterError, UsageError

NAME = "cmflow-scheduler"
NAMESPACE = "cmflow"
log = logging.getLogger(__name__)


class SchedulerLoop:
    """The actor's body (plain Python, so tests can drive it without Ray): a thread that ticks forever."""

    def __init__(
        self,
        root: str,
        options: dict[str, Any] | None = None,
        interval_s: float = 30.0,
        submit_address: str | None = None,
        ship_code: bool = True,
    ) -> None:
        self.root = root
        self.options = dict(options or {})
        self.interval_s = float(interval_s)
        self.submit_address = submit_address
        self.ship_code = ship_code
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.ticks = 0
        self.fired = 0
        self.last_tick_at: str | None = None
        self.last_error = ""
        self.recent: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cmflow-scheduler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick_now()
            self._stop.wait(self.interval_s)

    def tick_now(self) -> list[dict[str, Any]]:
        """One tick over every schedule under the root; errors are recorded, never raised."""
        from dataclasses import asdict

        from cmflow.schedule.tick import tick
        from cmflow.storage import Storage
        from cmflow.submit import RayJobSubmitter, resolve_token

        with self._lock:
            try:
                submitter = RayJobSubmitter(self.submit_address, resolve_token(), ship_code=self.ship_code)
                fires = [
                    asdict(f)
                    for f in tick(datetime.now(timezone.utc), Storage(self.root, self.options), submitter)
                ]
                self.last_error = ""
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                fires = []
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("cmflow scheduler tick failed: %s", self.last_error)
            self.ticks += 1
            self.last_tick_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.fired += sum(1 for f in fires if f["outcome"] == "submitted")
            self.recent = (self.recent + [f for f in fires if f["outcome"] != "taken"])[-20:]
            return fires

    def status(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "interval_s": self.interval_s,
            "submit_address": self.submit_address,
            "started_at": self.started_at,
            "ticks": self.ticks,
            "fired": self.fired,
            "last_tick_at": self.last_tick_at,
            "last_error": self.last_error,
            "recent": list(self.recent),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def shutdown(self) -> None:
        self._stop.set()


def _actor_class() -> Any:
    import ray

    return ray.remote(SchedulerLoop)


def _connect(address: str | None, runtime_env: dict[str, Any] | None = None) -> None:
    """Attach to the cluster; ``runtime_env`` (job level) is what the detached actor inherits."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(
            address=address or "auto",
            namespace=NAMESPACE,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address or 'auto'}: {exc}; pass --address HEAD:6379 (the GCS "
            "address) or run this on a cluster node"
        ) from None


def _handle() -> Any:
    import ray

    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def start(
    address: str | None,
    root: str,
    *,
    options: dict[str, Any] | None = None,
    interval_s: float = 30.0,
    submit_address: str | None = None,
    ship_code: bool = True,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Start the scheduler actor (or find the running one); returns its status."""
    import ray

    from cmflow.submit import build_runtime_env

    if interval_s <= 0:
        raise UsageError(f"--interval-s must be > 0, got {interval_s:g}")
    # Local directories (the cmflow package) can only be uploaded at the job level; the actor inherits it.
    _connect(address, build_runtime_env(None, ship_code=ship_code))
    handle = (
        _actor_class()
        .options(
            name=NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=-1,
            num_cpus=0,
        )
        .remote(root, options or {}, interval_s, submit_address, ship_code)
    )
    try:
        state = ray.get(handle.status.remote(), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001
        raise ClusterError(f"the scheduler actor did not start: {type(exc).__name__}: {exc}") from None
    if state["root"] != root:
        raise UsageError(
            f"a scheduler is already running for root {state['root']}; stop it first with `cmflow scheduler stop`"
        )
    return state


def status(address: str | None, timeout_s: float = 60.0) -> dict[str, Any] | None:
    """The running scheduler's status, or None when there is none."""
    import ray

    _connect(address)
    handle = _handle()
    if handle is None:
        return None
    try:
        return ray.get(handle.status.remote(), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001
        raise ClusterError(f"the scheduler actor does not answer: {type(exc).__name__}: {exc}") from None


def stop(address: str | None) -> bool:
    """Kill the scheduler actor for good (no restart); False when none was running."""
    import ray

    _connect(address)
    handle = _handle()
    if handle is None:
        return False
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 30
    while _handle() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    return True
