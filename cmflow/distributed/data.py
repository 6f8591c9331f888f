"""A sharded dataset streamed into Ray Train workers through Ray Data, in the order of a SampleOrder.

:func:`cmflow.distributed.train.fit` hands Ray Train one Ray Dataset per lane of the
:class:`~cmflow.training.order.SampleOrder` (``TorchTrainer(datasets={"lane0": ..., ...})`` with
``DataConfig(datasets_to_split=[])`` and ordered execution), and rank r reads the lanes l with l % W == r
through ``ray.train.get_dataset_shard``. Each lane's dataset is built by a :class:`LaneDataset` factory,
which Ray Train calls whenever the worker group (re)starts:

* its rows are the lane's windows from the data position on (the step of the last checkpoint Ray Train
  has registered, which rank 0 records in the stage's work folder after each one: ``data-position.json``);
* a Ray Data map task (:class:`WindowReader`, 0 CPUs with a small fixed concurrency -- reading and
  permuting is I/O and memcpy, and the workers hold the CPUs) reads the shards a window touches from the
  store, checks them against the manifest (sha256), and emits the window's images, labels and lane
  positions in visiting order.

A worker (:class:`StreamBatches`) takes b = batch_size / lanes rows per lane and step, checks that they sit
at the positions the step needs -- skipping forward when the stream started at an older checkpoint than
the one restored -- and seeds each sample's RNG by its position in the global batch. No process holds
more than a few windows, whatever the dataset's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmflow.data.shards import DatasetInfo, read_shard
from cmflow.errors import StageError
from cmflow.storage import Manifest, Storage
from cmflow.training.loop import Batch, batch_from_rows
from cmflow.training.order import SampleOrder, sample_seed

POSITION_FILE = "data-position.json"
READ_CONCURRENCY = 2  # window reads in flight per lane


@dataclass(frozen=True)
class StreamPlan:
    """What every lane's stream is made of: the dataset artifact, its sample order, batch and run length."""

    storage_root: str
    storage_options: dict[str, Any]
    manifest: str  # the dataset artifact's manifest (JSON, with its uri)
    info: dict[str, Any]  # its dataset.json
    order: SampleOrder
    batch_size: int
    total_steps: int
    seed: int
    work_key: str  # the stage's durable work folder (relative to the root), where data-position.json lives

    @property
    def lane_batch(self) -> int:
        return self.order.lane_batch(self.batch_size)

    def storage(self) -> Storage:
        return Storage(self.storage_root, self.storage_options)

    def start_step(self) -> int:
        """The step of the last checkpoint rank 0 recorded as registered (0 before the first)."""
        try:
            data = json.loads(self.storage().read_bytes(f"{self.work_key}/{POSITION_FILE}"))
        except FileNotFoundError:
            return 0
        except (ValueError, UnicodeDecodeError):
            return 0  # unreadable: start at 0 and let the workers skip forward
        return max(0, min(int(data.get("step", 0)), self.total_steps))

    def record_position(self, step: int) -> None:
        self.storage().write_bytes(f"{self.work_key}/{POSITION_FILE}", json.dumps({"step": step}).encode())

    def dataset(self, lane: int, start_step: int) -> Any:
        """The Ray Dataset of lane ``lane`` from global step ``start_step`` to the end of the run."""
        import ray.data

        b = self.lane_batch
        windows = self.order.windows(lane, start_step * b, self.total_steps * b)
        rows = [{"epoch": w.epoch, "index": w.index} for w in windows]
        if not rows:
            rows = [{"epoch": -1, "index": -1}]  # nothing left to read: an empty window
        reader = WindowReader(self, lane, start_step * b, self.total_steps * b)
        return ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            reader, batch_size=1, num_cpus=0, concurrency=READ_CONCURRENCY
        )


@dataclass(frozen=True)
class LaneDataset:
    """The dataset factory Ray Train calls at every worker-group start (see the module docstring)."""

    plan: StreamPlan
    lane: int

    def __call__(self) -> Any:
        return self.plan.dataset(self.lane, self.plan.start_step())


class WindowReader:
    """Ray Data map function: one window descriptor -> its rows (images, labels, positions) in order."""

    def __init__(self, plan: StreamPlan, lane: int, start: int, stop: int) -> None:
        self.plan, self.lane, self.start, self.stop = plan, lane, start, stop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan, order = self.plan, self.plan.order
        info = DatasetInfo(plan.info)
        epoch, index = int(batch["epoch"][0]), int(batch["index"][0])
        if epoch < 0:
            return _empty(info)
        window = order.window_at(self.lane, epoch, index)
        storage = plan.storage()
        manifest = Manifest.from_json(plan.manifest)
        shards: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        images, labels = [], []
        for segment in window.segments:
            if segment.shard not in shards:
                shards[segment.shard] = read_shard(
                    lambda name: storage.read_artifact_file(manifest, name), info, segment.shard
                )
            shard_images, shard_labels = shards[segment.shard]
            images.append(shard_images[segment.start : segment.stop])
            if shard_labels is not None:
                labels.append(shard_labels[segment.start : segment.stop])
        perm = order.permutation(window)
        positions = window.position + np.arange(window.size, dtype=np.int64)
        keep = (positions >= self.start) & (positions < self.stop)
        out = {"images": np.concatenate(images)[perm][keep], "position": positions[keep]}
        if labels:
            out["labels"] = np.concatenate(labels)[perm][keep]
        return out


def _empty(info: DatasetInfo) -> dict[str, np.ndarray]:
    out = {"images": np.zeros((0, *info.shape), np.uint8), "position": np.zeros(0, np.int64)}
    if info.has_labels:
        out["labels"] = np.zeros(0, np.int64)
    return out


class _Lane:
    """One lane's stream as whole windows (one Ray Data block each), sliced into batches here.

    Ray Data hands over a window at a time -- no per-batch conversion threads competing with the training
    loop for the interpreter -- and the lane keeps only the current window.
    """

    def __init__(self, plan: StreamPlan, lane: int, iterator: Any) -> None:
        self.plan, self.lane = plan, lane
        self._open(iterator)

    def _open(self, iterator: Any) -> None:
        self._blocks = iter(iterator.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
        self._window: dict[str, np.ndarray] | None = None

    def take(self, step: int) -> dict[str, np.ndarray]:
        """Rows at positions [step b, (step + 1) b): skips forward past older rows; reopens the stream at
        ``step`` when it starts later (a checkpoint older than the recorded data position was restored)."""
        b = self.plan.lane_batch
        want = step * b
        parts: list[dict[str, np.ndarray]] = []
        need = b
        while need:
            window = self._window
            if window is None or not window["position"].shape[0]:
                try:
                    window = self._window = next(self._blocks)
                except StopIteration:
                    raise StageError(
                        f"the data stream of lane {self.lane} ended before step {step}"
                    ) from None
                continue
            position = window["position"]
            first = int(position[0])
            if first > want and not parts:
                self._open(self.plan.dataset(self.lane, step).iterator())
                continue
            start = int(np.searchsorted(position, want)) if first < want else 0
            piece = {k: v[start : start + need] for k, v in window.items()}
            rest = {k: v[start + need :] for k, v in window.items()}
            self._window = rest
            if piece["position"].shape[0]:
                parts.append(piece)
                need -= piece["position"].shape[0]
                want += piece["position"].shape[0]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class StreamBatches:
    """A Ray Train worker's :class:`~cmflow.training.loop.BatchSource`: its lanes' rows of every step."""

    def __init__(
        self, plan: StreamPlan, rank: int, world: int, device: Any, shards: dict[int, Any] | None = None
    ) -> None:
        """``shards``: lane -> a Ray Data iterator of its stream; default Ray Train's ``get_dataset_shard``."""
        self.plan, self.device = plan, device
        self.lanes = plan.order.rank_lanes(rank, world)
        if shards is None:
            import ray.train

            shards = {lane: ray.train.get_dataset_shard(f"lane{lane}") for lane in self.lanes}
        self._streams = {lane: _Lane(plan, lane, shards[lane]) for lane in self.lanes}

    def batch(self, step: int) -> Batch:
        b = self.plan.lane_batch
        parts = [self._streams[lane].take(step) for lane in self.lanes]
        positions = [lane * b + j for lane in self.lanes for j in range(b)]
        seeds = [sample_seed(self.plan.seed, step, g) for g in positions]
        images = np.concatenate([p["images"] for p in parts])
        labels = np.concatenate([p["labels"] for p in parts]) if "labels" in parts[0] else None
        return batch_from_rows(images, labels, seeds, self.device)
