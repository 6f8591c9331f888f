"""Helpers for the cluster tests: a tiny demo spec and a fake submitter (imported by tests and conftest)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import yaml

from cmflow.errors import ClusterError
from cmflow.schedule.store import Schedule
from cmflow.schedule.tick import DuplicateSubmission


def demo_spec(
    root: str, *, name: str = "tiny", sleep_s: float = 0.0, options: dict | None = None
) -> dict[str, Any]:
    """A three-stage demo pipeline (no torch) with tracking off."""
    return {
        "name": name,
        "seed": 0,
        "storage": {"root": root, "options": options or {}},
        "tracking": {"enabled": False},
        "stages": {
            "left": {
                "kind": "demo.arrays",
                "params": {"n": 8, "seed": 1, "sleep_s": sleep_s},
                "resources": {"cpus": 0.5},
            },
            "right": {"kind": "demo.arrays", "params": {"n": 8, "seed": 2}, "resources": {"cpus": 0.5}},
            "total": {
                "kind": "demo.reduce",
                "inputs": {"a": "left", "b": "right"},
                "resources": {"cpus": 0.5},
            },
        },
    }


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class FakeSubmitter:
    """In-memory stand-in for the Ray job server: records submissions, refuses duplicates, fails on demand."""

    def __init__(self, *, finish: bool = True) -> None:
        self.finish = finish  # True: a submitted run is SUCCEEDED at once; False: it stays RUNNING
        self.submitted: list[str] = []
        self.metadata: dict[str, dict[str, str]] = {}
        self.statuses: dict[str, str] = {}
        self.stopped: list[str] = []
        self.failures = 0  # the next N submits raise ClusterError
        self.lock = threading.Lock()

    def submit(self, schedule: Schedule, run_id: str, metadata: dict[str, str]) -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise ClusterError("cannot reach the Ray job server (fake outage)")
            if run_id in self.statuses:
                raise DuplicateSubmission(f"job {run_id} already exists")
            self.submitted.append(run_id)
            self.metadata[run_id] = dict(metadata)
            self.statuses[run_id] = "SUCCEEDED" if self.finish else "RUNNING"

    def status(self, schedule: Schedule, run_id: str) -> str | None:
        return self.statuses.get(run_id)

    def stop(self, schedule: Schedule, run_id: str) -> None:
        self.stopped.append(run_id)
        self.statuses[run_id] = "STOPPED"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
