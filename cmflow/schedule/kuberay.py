"""A schedule as a KubeRay ``RayCronJob``, rendered from ``cluster/kuberay/raycronjob.yaml.tmpl``.

The template is plain YAML with ``${name}`` placeholders. It is parsed first and filled value by value, so a
value (a cron string, an entrypoint) can never change the document's structure. ``${ray_version}`` comes
from the installed ``ray`` distribution at render time, so the manifest matches the Ray the image pins.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Any

from cmflow.errors import InputError, UsageError
from cmflow.schedule.store import Schedule

TEMPLATE = Path(__file__).resolve().parents[2] / "cluster" / "kuberay" / "raycronjob.yaml.tmpl"
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")


def ray_version() -> str:
    """The installed ray's version (read from its metadata; ray is not imported)."""
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        raise UsageError(
            "ray is not installed, so the RayCronJob has no Ray version; pip install ray"
        ) from None


def default_image() -> str:
    return f"ghcr.io/your-org/cmflow:0.1.0-ray{ray_version()}-gpu"


def _fill(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {_fill(k, values): _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if not isinstance(node, str):
        return node
    whole = _PLACEHOLDER.fullmatch(node)
    if whole:
        return values[whole.group(1)]
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)


def kuberay_cronjob(
    schedule: Schedule,
    *,
    root: str,
    image: str | None = None,
    namespace: str = "default",
    gpu_workers: int = 1,
    tracking_uri: str = "http://mlflow.mlflow.svc:5000",
    template: str | Path | None = None,
) -> dict[str, Any]:
    """The ``RayCronJob`` manifest (a dict) that ticks ``schedule`` on an ephemeral cluster."""
    import yaml

    if schedule.cron is None:
        raise UsageError(f"schedule {schedule.id!r} has no cron; a RayCronJob needs one (use the scheduler)")
    path = Path(template) if template else TEMPLATE
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"RayCronJob template {path} does not exist; run from a cmflow checkout or pass --template PATH"
        ) from None
    except yaml.YAMLError as exc:
        raise InputError(f"RayCronJob template {path} is not YAML ({type(exc).__name__}); fix it") from None
    values = {
        "schedule_id": schedule.id,
        "namespace": namespace,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "suspend": not schedule.enabled,
        "concurrency_policy": schedule.concurrency.capitalize(),
        "entrypoint": f"python -m cmflow.cli.main schedule tick {schedule.id} --root {root} --inline",
        "ray_version": ray_version(),
        "image": image or default_image(),
        "tracking_uri": tracking_uri,
        "gpu_workers": gpu_workers,
        "max_replicas": max(gpu_workers, 1),
    }
    try:
        manifest = _fill(document, values)
    except KeyError as exc:
        raise InputError(
            f"RayCronJob template {path} has an unknown placeholder ${{{exc.args[0]}}}"
        ) from None
    if schedule.concurrency == "allow":
        manifest["spec"].pop("concurrencyPolicy", None)
    return manifest
