"""The pure-torch loops: losses fall, and a run resumed from a checkpoint equals the uninterrupted run."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cmflow.data.sources import read_sklearn_digits
from cmflow.diffusion.losses import CDLoss, CTLoss, EDMLoss, ICTLoss
from cmflow.models.precond import CMPrecond, EDMPrecond
from cmflow.models.unet import make_unet
from cmflow.training import checkpoint, loop


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return read_sklearn_digits()[0][:256]


def _teacher_run(images: np.ndarray, seed: int = 0) -> tuple[loop.TrainState, loop.StepFn]:
    torch.manual_seed(seed)
    net = EDMPrecond(make_unet("tiny", 8, 1))
    cfg = loop.OptimConfig(lr=2e-3, lr_warmup_steps=2)
    state = loop.TrainState(net, loop.frozen_copy(net), loop.make_optimizer(net.parameters(), cfg))
    data = loop.ArrayBatches(images, None, 32, seed=seed)
    return state, loop.teacher_step(EDMLoss(), data, cfg, ema_rate=0.99)


def _cm_run(images: np.ndarray, method: str) -> tuple[loop.TrainState, loop.StepFn]:
    torch.manual_seed(1)
    teacher = EDMPrecond(make_unet("tiny", 8, 1)).eval().requires_grad_(False)
    student = CMPrecond.from_edm(teacher).requires_grad_(True)
    cfg = loop.OptimConfig(lr=1e-3)
    state = loop.TrainState(
        student,
        loop.frozen_copy(student),
        loop.make_optimizer(student.parameters(), cfg),
        target=None if method == "ict" else loop.frozen_copy(student),
    )
    data = loop.ArrayBatches(images, None, 16, seed=3)
    if method == "cd":
        return state, loop.cd_step(CDLoss(18), teacher, data, cfg, mu=0.95, ema_rate=0.99)
    if method == "ct":
        return state, loop.ct_step(CTLoss(), data, cfg, total_steps=8, s0=2, s1=20, mu0=0.9, ema_rate=0.99)
    return state, loop.ict_step(ICTLoss(), data, cfg, total_steps=8, s0=4, s1=32, ema_rate=0.99)


def test_teacher_loss_falls_and_rows_are_logged(images: np.ndarray) -> None:
    state, step = _teacher_run(images)
    rows: list[dict[str, float]] = []
    loop.run_loop(
        state,
        step,
        total_steps=60,
        images_per_step=32,
        log_every=20,
        hooks=loop.LoopHooks(on_log=rows.append),
    )
    assert [r["step"] for r in rows] == [20, 40, 60] and rows == state.metrics
    assert rows[-1]["loss"] < rows[0]["loss"] and all(r["imgs_per_s"] > 0 for r in rows)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("method", ["teacher", "cd", "ct", "ict"])
def test_resume_from_checkpoint_matches_uninterrupted_run(images: np.ndarray, method: str) -> None:
    def make() -> tuple[loop.TrainState, loop.StepFn]:
        return _teacher_run(images) if method == "teacher" else _cm_run(images, method)

    straight, step = make()
    loop.run_loop(straight, step, total_steps=8, images_per_step=16, log_every=4)

    first, step = make()
    saved: list[bytes] = []
    loop.run_loop(
        first,
        step,
        total_steps=5,
        images_per_step=16,
        log_every=4,
        checkpoint_every=4,
        hooks=loop.LoopHooks(on_checkpoint=lambda s: saved.append(checkpoint.checkpoint_bytes(s))),
    )
    resumed, step = make()  # fresh weights and optimizer: everything must come from the checkpoint
    checkpoint.restore(resumed, checkpoint.load_checkpoint(saved[0]))
    assert resumed.step == resumed.resumed_from_step == 4
    loop.run_loop(resumed, step, total_steps=8, images_per_step=16, log_every=4)
    _assert_same_weights(straight.online, resumed.online)
    _assert_same_weights(straight.ema, resumed.ema)
    if straight.target is not None:
        _assert_same_weights(straight.target, resumed.target)
    assert [r["step"] for r in resumed.metrics] == [4, 8]


def test_array_batches_follow_the_sample_order() -> None:
    """W ranks x B/W get the rows and per-sample seeds of the 1-rank batch B; an epoch visits every row."""
    from cmflow.training.order import SampleOrder

    n = 300
    ids = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    ids[:, 0, 0, 0], ids[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256  # each row names itself
    order = SampleOrder((n,), seed=5, lanes=2, window=100)
    whole = loop.ArrayBatches(ids, None, 30, seed=5, order=order)
    ranks = [loop.ArrayBatches(ids, None, 30, seed=5, order=order, rank=r, world=2) for r in range(2)]
    epoch: list[int] = []
    for k in range(order.partition // 15):  # one epoch: 10 steps of 2 lanes x 15 rows
        one = whole.batch(k)
        parts = [r.batch(k) for r in ranks]
        assert torch.equal(torch.cat([p.x for p in parts]), one.x)  # lane 0 on rank 0, lane 1 on rank 1
        assert parts[0].generator.seeds + parts[1].generator.seeds == one.generator.seeds
        assert not set(parts[0].generator.seeds) & set(parts[1].generator.seeds)
        raw = ((one.x[:, 0, 0, :2] + 1) * 127.5).round().long()
        epoch.extend((raw[:, 0] * 256 + raw[:, 1]).tolist())
    assert sorted(epoch) == list(range(n))  # P = 150 rows per lane: 300 = every row exactly once


def test_time_budget_stops_early(images: np.ndarray) -> None:
    state, step = _teacher_run(images)
    loop.run_loop(
        state,
        step,
        total_steps=10_000,
        images_per_step=32,
        log_every=1000,
        hooks=loop.LoopHooks(should_stop=lambda s: s.step >= 3),
    )
    assert state.step == 3 and state.metrics[-1]["step"] == 3


def test_checkpoint_loading_never_runs_code(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import io

    buffer = io.BytesIO()
    torch.save({"format": 1, "payload": RunsCode()}, buffer, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(buffer.getvalue())
    assert not marker.exists()
