"""Fan a stage's work out over Ray tasks that each get the stage's per-task resources.

Stages that coordinate work (``teacher``, ``distill``, ``teacher_sample``, ``evaluate``) run with no CPU or
GPU of their own; :func:`iter_tasks` runs ``fn(item)`` for every item in its own Ray task with
``num_cpus`` / ``num_gpus`` / ``memory`` / custom resources from the stage's ``resources``, at most
``max_in_flight`` at a time, and yields the results in item order as they become available (so a caller
can stream them into a file while later items still run). Inside each task torch uses as many threads as
the task has CPUs, and CUDA when the task has a GPU. When Ray is not running (a stage function called
directly, as the unit tests do) the items run here, one after another, with the same thread setting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from cmflow.distributed.errors import unwrap

T = TypeVar("T")
R = TypeVar("R")


def task_threads(cpus: float) -> int:
    """Torch intra-op threads for a task holding ``cpus`` CPUs (at least 1)."""
    return max(1, int(cpus))


def task_device(gpus: float) -> str:
    """``"cuda"`` inside a task that holds a GPU (and sees one), else ``"cpu"``."""
    if gpus <= 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _call(fn: Callable[[T], R], item: T, cpus: float) -> R:
    import torch

    torch.set_num_threads(task_threads(cpus))
    return fn(item)


def iter_tasks(
    fn: Callable[[T], R],
    items: Sequence[T],
    resources: Any,
    *,
    name: str,
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """``fn(item)`` for every item, each in a Ray task with ``resources`` (a :class:`cmflow.spec.Resources`);
    results in item order. ``fn`` and the items travel by pickle: put large inputs in the object store first
    (``ray.put``) and pass the reference. A task's own error (an InputError, say) is re-raised as itself."""
    import ray

    if not ray.is_initialized():
        for item in items:
            yield _call(fn, item, resources.cpus)
        return
    from ray.exceptions import RayTaskError

    remote = ray.remote(_call).options(**resources.ray_options(), name=name)
    limit = max_in_flight or len(items) or 1
    submitted: dict[Any, int] = {}
    done: dict[int, Any] = {}
    following = 0
    try:
        while following < len(items):
            # at most ``limit`` running and ``2 limit`` held (running or finished out of order): bounded memory
            while (
                len(submitted) < limit
                and len(submitted) + len(done) < 2 * limit
                and len(submitted) + len(done) + following < len(items)
            ):
                index = following + len(done) + len(submitted)
                submitted[remote.remote(fn, items[index], resources.cpus)] = index
            ready, _ = ray.wait(list(submitted), num_returns=1)
            for ref in ready:
                done[submitted.pop(ref)] = ref
            while following in done:
                yield ray.get(done.pop(following))
                following += 1
    except RayTaskError as exc:
        raise unwrap(exc) from None
    finally:
        for ref in submitted:
            ray.cancel(ref)


def run_tasks(
    fn: Callable[[T], R], items: Sequence[T], resources: Any, *, name: str, max_in_flight: int | None = None
) -> list[R]:
    """:func:`iter_tasks` collected into a list."""
    return list(iter_tasks(fn, items, resources, name=name, max_in_flight=max_in_flight))
