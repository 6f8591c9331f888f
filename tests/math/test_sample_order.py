"""The training sample order (cmflow.training.order): epochs visit every row, lanes are disjoint and local
to few shards, positions resume exactly, and any worker count that divides the lanes sees the same batches."""

from __future__ import annotations

import numpy as np
import pytest

from cmflow.training.order import SampleOrder, sample_seed

SHARDS = (100, 100, 100, 37)  # 337 rows: not a multiple of the lanes, a short last shard


@pytest.mark.parametrize("lanes", [1, 2, 3, 4])
def test_every_epoch_visits_every_row_once_plus_padding(lanes: int) -> None:
    order = SampleOrder(SHARDS, seed=3, lanes=lanes, window=50)
    for epoch in range(3):
        parts = [
            order.lane_rows(lane, epoch * order.partition, (epoch + 1) * order.partition)
            for lane in range(lanes)
        ]
        rows = np.concatenate(parts)
        assert rows.shape[0] == lanes * order.partition < 337 + lanes
        assert set(rows.tolist()) == set(range(337))  # every row ...
        assert (
            rows.shape[0] - len(set(rows.tolist())) == lanes * order.partition - 337
        )  # ... once, but padding
        if lanes > 1:  # lanes share no row (the padding repeats rows of the epoch's first lane)
            assert not set(parts[1].tolist()) & set(parts[-1].tolist()) or lanes == 2


def test_epochs_and_seeds_give_other_orders() -> None:
    order = SampleOrder(SHARDS, seed=3, lanes=2, window=50)
    p = order.partition
    assert not np.array_equal(order.lane_rows(0, 0, p), order.lane_rows(0, p, 2 * p))
    other = SampleOrder(SHARDS, seed=4, lanes=2, window=50)
    assert not np.array_equal(order.lane_rows(0, 0, p), other.lane_rows(0, 0, p))
    np.testing.assert_array_equal(
        order.lane_rows(1, 0, 3 * p), SampleOrder(SHARDS, 3, 2, 50).lane_rows(1, 0, 3 * p)
    )


def test_a_resumed_stream_continues_the_same_order() -> None:
    order = SampleOrder(SHARDS, seed=0, lanes=2, window=64)
    full = order.lane_rows(1, 0, 1000)
    for start in (0, 1, 63, 64, 168, 169, 500):
        np.testing.assert_array_equal(order.lane_rows(1, start, 1000), full[start:])


def test_windows_stay_within_few_shards() -> None:
    order = SampleOrder((64,) * 40, seed=1, lanes=4, window=64)
    for lane in range(4):
        for window in order.windows(lane, 0, 3 * order.partition):
            assert len({s.shard for s in window.segments}) <= 2  # one shard's worth spans at most 2 shards
            assert sum(s.stop - s.start for s in window.segments) == window.size


def test_worker_counts_that_divide_the_lanes_see_the_same_global_batches() -> None:
    order = SampleOrder(SHARDS, seed=9, lanes=4, window=40)
    for step in range(0, 40, 7):
        whole = order.step_rows(step, 16)
        for world in (1, 2, 4):
            ranks = [order.step_rows(step, 16, order.rank_lanes(r, world)) for r in range(world)]
            assert sorted(np.concatenate(ranks).tolist()) == sorted(whole.tolist())
            for a in range(world):
                for b in range(a + 1, world):
                    assert not set(order.rank_lanes(a, world)) & set(order.rank_lanes(b, world))
    with pytest.raises(ValueError, match="cannot share 4 lanes"):
        order.rank_lanes(0, 3)
    with pytest.raises(ValueError, match="not divisible by the 4 lanes"):
        order.lane_batch(10)


def test_sample_seeds_are_stable_and_distinct() -> None:
    seeds = {sample_seed(7, step, pos) for step in range(50) for pos in range(64)}
    assert len(seeds) == 50 * 64 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(7, 3, 5) == sample_seed(7, 3, 5) != sample_seed(8, 3, 5)
