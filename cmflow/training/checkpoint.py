"""Training checkpoints: one ``torch.save`` of a dict of tensors and plain values, read with ``weights_only``.

A checkpoint holds the online network, the evaluation EMA, the CD/CT target (if any), the optimizer state,
the step, the accumulated training seconds, the metric rows and the global torch RNG state (dropout). The
data order and noise RNG need no saving: both derive from the step (:mod:`cmflow.training.order`).
Loading uses ``torch.load(weights_only=True)``, so a checkpoint can never run code.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from cmflow.training.loop import TrainState

FORMAT = 1
FILENAME = "checkpoint.pt"


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def checkpoint_dict(state: TrainState, **extra: Any) -> dict[str, Any]:
    """The checkpoint contents of ``state`` (tensors moved to the CPU); ``extra`` must be plain data."""
    data: dict[str, Any] = {
        "format": FORMAT,
        "step": int(state.step),
        "train_seconds": float(state.train_seconds),
        "online": _cpu_state(state.online),
        "ema": _cpu_state(state.ema),
        "target": _cpu_state(state.target) if state.target is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "metrics": [dict(row) for row in state.metrics],
        "rng_cpu": torch.get_rng_state(),
        **extra,
    }
    if torch.cuda.is_available():
        data["rng_cuda"] = torch.cuda.get_rng_state_all()
    return data


def checkpoint_bytes(state: TrainState, **extra: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint_dict(state, **extra), buffer)
    return buffer.getvalue()


def load_checkpoint(data: bytes) -> dict[str, Any]:
    """Parse checkpoint bytes with ``weights_only=True``; ValueError if they are not a cmflow checkpoint."""
    try:
        content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, ...
        raise ValueError(f"not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"not a cmflow training checkpoint (format {FORMAT})")
    return content


def restore(state: TrainState, content: dict[str, Any], *, restore_rng: bool = True) -> TrainState:
    """Load ``content`` (from :func:`load_checkpoint`) into ``state`` in place; sets ``resumed_from_step``."""
    state.online.load_state_dict(content["online"])
    state.ema.load_state_dict(content["ema"])
    if state.target is not None:
        if content.get("target") is None:
            raise ValueError("the checkpoint has no target network but this run needs one")
        state.target.load_state_dict(content["target"])
    state.optimizer.load_state_dict(content["optimizer"])
    state.step = int(content["step"])
    state.resumed_from_step = state.step
    state.train_seconds = float(content.get("train_seconds", 0.0))
    state.metrics = [dict(row) for row in content.get("metrics", [])]
    if restore_rng:
        torch.set_rng_state(content["rng_cpu"])
        if "rng_cuda" in content and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(content["rng_cuda"])
    return state
