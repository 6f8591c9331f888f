"""The order in which training visits a sharded dataset: seeded, epoch by epoch, resumable, worker-count free.

A dataset of N images lives in S fixed-size shards (``shard_sizes``, written in a shuffled order by
``prepare_data``). Training reads it through ``lanes`` independent streams (MosaicML StreamingDataset's
"canonical nodes"), so that no worker ever holds the whole dataset and every worker reads only its own
shards:

* **epoch e** -- the shards are permuted with a generator seeded by (seed, e) and concatenated, giving the
  epoch's sequence of all N dataset rows; it is padded to ``lanes * P`` rows (P = ceil(N / lanes)) by
  repeating its first rows, and cut into ``lanes`` contiguous partitions of P rows. Lane l's partition
  touches only the few shards that hold those rows.
* **windows** -- each partition is cut into windows of ``window`` rows and each window is permuted with a
  generator seeded by (seed, e, l, window index): the local shuffle a streaming reader can afford.
* **the lane stream** -- lane l's epochs one after another; its position p lies in epoch p // P.
* **global step k** takes positions [k b, (k + 1) b) of every lane, b = batch_size / lanes, lane 0's rows
  first: the global batch. A run with W workers gives rank r the lanes l with l % W == r, so any W that
  divides ``lanes`` trains on exactly the same global batches, and ranks never share a row within an epoch.

Every epoch visits every row once (plus at most lanes - 1 padding repeats), in an order that depends only
on (seed, lanes, window, shard sizes); a run resumed at step k continues at position k b. Per-sample noise
is seeded by :func:`sample_seed` of the sample's (step, position in the global batch), never by the rank,
so it too is independent of the worker count. Pure numpy; no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["SampleOrder", "Segment", "Window", "sample_seed"]


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (sha256 of their decimal text: stable across numpy versions)."""
    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def sample_seed(seed: int, step: int, position: int) -> int:
    """The RNG seed of the sample at ``position`` of global batch ``step`` (noise, noise levels, indices)."""
    return _seed(seed, 1, step, position)


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of shard ``shard`` (offsets within the shard)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class Window:
    """One window of a lane's stream: where its rows come from and in which order they are visited."""

    epoch: int
    lane: int
    index: int  # window number within the lane's partition
    position: int  # lane-stream position of the window's first row
    segments: tuple[Segment, ...]  # the window's rows in partition order
    size: int


@dataclass(frozen=True)
class SampleOrder:
    shard_sizes: tuple[int, ...]
    seed: int
    lanes: int
    window: int

    def __post_init__(self) -> None:
        if not self.shard_sizes or min(self.shard_sizes) < 1:
            raise ValueError(f"shard sizes must be positive, got {self.shard_sizes}")
        if self.lanes < 1 or self.window < 1:
            raise ValueError(f"lanes and window must be >= 1, got {self.lanes}, {self.window}")
        if self.lanes > self.num_rows:
            raise ValueError(f"{self.lanes} lanes for {self.num_rows} rows: use at most one lane per row")

    @cached_property
    def num_rows(self) -> int:
        return int(sum(self.shard_sizes))

    @cached_property
    def _starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)

    @property
    def partition(self) -> int:
        """P: rows per lane per epoch."""
        return -(-self.num_rows // self.lanes)

    @property
    def windows_per_epoch(self) -> int:
        return -(-self.partition // self.window)

    def lane_batch(self, batch_size: int) -> int:
        """b = batch_size / lanes (the batch must split evenly over the lanes)."""
        if batch_size % self.lanes:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {self.lanes} lanes")
        return batch_size // self.lanes

    # -- epochs and windows ------------------------------------------------------------------------------

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(_seed(self.seed, 0, epoch)).permutation(len(self.shard_sizes))

    def _epoch_rows(self, epoch: int, lo: int, hi: int) -> list[Segment]:
        """Segments covering positions [lo, hi) of epoch ``epoch``'s padded row sequence."""
        sizes = np.asarray(self.shard_sizes, dtype=np.int64)[self.shard_order(epoch)]
        ends = np.cumsum(sizes)
        order = self.shard_order(epoch)
        segments: list[Segment] = []
        for a, b in ((lo, min(hi, self.num_rows)), (max(lo, self.num_rows), hi)):
            if a >= b:
                continue
            if a >= self.num_rows:  # padding: the epoch's first rows again
                a, b = a - self.num_rows, b - self.num_rows
            i = int(np.searchsorted(ends, a, side="right"))
            while a < b:
                begin = int(ends[i] - sizes[i])
                stop = min(b, int(ends[i]))
                segments.append(Segment(int(order[i]), a - begin, stop - begin))
                a, i = stop, i + 1
        return segments

    def window_at(self, lane: int, epoch: int, index: int) -> Window:
        lo = lane * self.partition + index * self.window
        hi = min(lane * self.partition + self.partition, lo + self.window)
        position = epoch * self.partition + index * self.window
        segments = tuple(self._epoch_rows(epoch, lo, hi))
        return Window(epoch, lane, index, position, segments, hi - lo)

    def permutation(self, window: Window) -> np.ndarray:
        """The visiting order of the window's rows (indices into its rows in segment order)."""
        rng = np.random.default_rng(_seed(self.seed, 2, window.epoch, window.lane, window.index))
        return rng.permutation(window.size)

    def windows(self, lane: int, start: int, stop: int) -> list[Window]:
        """The windows covering lane positions [start, stop)."""
        found = []
        position = start - start % self.partition + (start % self.partition) // self.window * self.window
        while position < stop:
            epoch, within = divmod(position, self.partition)
            window = self.window_at(lane, epoch, within // self.window)
            found.append(window)
            position = window.position + window.size
        return found

    # -- rows ------------------------------------------------------------------------------------------------

    def rows(self, window: Window) -> np.ndarray:
        """Dataset row indices of the window's rows, in visiting order."""
        rows = np.concatenate(
            [np.arange(s.start, s.stop, dtype=np.int64) + self._starts[s.shard] for s in window.segments]
        )
        return rows[self.permutation(window)]

    def lane_rows(self, lane: int, start: int, stop: int) -> np.ndarray:
        """Dataset row indices of lane positions [start, stop) (the in-memory reference of the stream)."""
        parts = []
        for window in self.windows(lane, start, stop):
            rows = self.rows(window)
            lo, hi = max(start - window.position, 0), min(stop - window.position, window.size)
            parts.append(rows[lo:hi])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def step_rows(self, step: int, batch_size: int, lanes: range | list[int] | None = None) -> np.ndarray:
        """Dataset rows of global batch ``step`` (for the given lanes, in lane order)."""
        b = self.lane_batch(batch_size)
        chosen = range(self.lanes) if lanes is None else lanes
        return np.concatenate([self.lane_rows(lane, step * b, (step + 1) * b) for lane in chosen])

    def rank_lanes(self, rank: int, world: int) -> list[int]:
        """The lanes rank ``rank`` of ``world`` reads (lanes must split evenly over the workers)."""
        if self.lanes % world:
            raise ValueError(f"{world} workers cannot share {self.lanes} lanes evenly")
        return [lane for lane in range(self.lanes) if lane % world == rank]
