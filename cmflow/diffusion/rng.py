"""Random-number plumbing: per-sample seeds and dropout-mask synchronisation.

* :class:`StackedRandomGenerator` (after EDM ``generate.py``): one ``torch.Generator`` per sample seed, so
  the noise of sample ``s`` depends only on ``s`` -- sampling seeds [0, N) gives the same images for any batch
  split or worker count.
* :func:`randn`, :func:`rand`, :func:`randint` accept ``generator`` = ``None`` (global RNG), a
  ``torch.Generator`` (drawn on its own device, then moved) or a :class:`StackedRandomGenerator`.
* :func:`call_with_shared_rng` runs the online and target evaluations of a consistency loss from the same
  RNG state of the device the model is on (CUDA generator on GPU, CPU generator otherwise), so dropout masks
  agree; the fix for the CPU-only ``th.get_rng_state`` sync in the openai code (reference Sec. 3.1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar, Union

import torch
from torch import Tensor, nn

__all__ = [
    "Generator",
    "StackedRandomGenerator",
    "call_with_shared_rng",
    "get_rng_state",
    "mix_seed",
    "module_device",
    "rand",
    "randint",
    "randn",
    "randn_like",
    "seed_batches",
    "set_rng_state",
]

T = TypeVar("T")
U = TypeVar("U")


class StackedRandomGenerator:
    """A batch of independent generators, one per sample seed (EDM ``StackedRandomGenerator``).

    Every draw has a leading batch dimension equal to ``len(seeds)``; row ``i`` comes from ``seeds[i]`` alone.
    Seeds are reduced modulo 2^32 as in EDM.
    """

    def __init__(self, device: torch.device | str, seeds: Iterable[int]) -> None:
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(self.device).manual_seed(s % (1 << 32)) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _check(self, size: Sequence[int]) -> tuple[int, ...]:
        size = tuple(size)
        if not size or size[0] != len(self.generators):
            raise ValueError(f"leading dimension {size[:1]} must equal the number of seeds {len(self)}")
        return size[1:]

    def randn(self, size: Sequence[int], **kwargs) -> Tensor:
        rest = self._check(size)
        return torch.stack(
            [torch.randn(rest, generator=g, device=self.device, **kwargs) for g in self.generators]
        )

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout).to(x.device)

    def rand(self, size: Sequence[int], **kwargs) -> Tensor:
        rest = self._check(size)
        return torch.stack(
            [torch.rand(rest, generator=g, device=self.device, **kwargs) for g in self.generators]
        )

    def randint(self, low: int, high: int, size: Sequence[int], **kwargs) -> Tensor:
        rest = self._check(size)
        return torch.stack(
            [
                torch.randint(low, high, rest, generator=g, device=self.device, **kwargs)
                for g in self.generators
            ]
        )


Generator = Union[torch.Generator, StackedRandomGenerator]  # noqa: UP007 (runtime alias, py310-safe)


def _gen_device(generator: torch.Generator) -> torch.device:
    return torch.device(generator.device)


def randn(
    shape: Sequence[int],
    *,
    generator: Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal of ``shape``, from ``generator`` (see module docstring), on ``device``."""
    if isinstance(generator, StackedRandomGenerator):
        return generator.randn(shape, dtype=dtype).to(device)
    if generator is None:
        return torch.randn(tuple(shape), dtype=dtype, device=device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=_gen_device(generator)).to(
        device
    )


def randn_like(x: Tensor, generator: Generator | None = None) -> Tensor:
    """Standard normal shaped like ``x`` (same dtype and device)."""
    return randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def rand(
    shape: Sequence[int],
    *,
    generator: Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform [0, 1) of ``shape``, from ``generator``, on ``device``."""
    if isinstance(generator, StackedRandomGenerator):
        return generator.rand(shape, dtype=dtype).to(device)
    if generator is None:
        return torch.rand(tuple(shape), dtype=dtype, device=device)
    return torch.rand(tuple(shape), generator=generator, dtype=dtype, device=_gen_device(generator)).to(
        device
    )


def randint(
    low: int,
    high: int,
    size: Sequence[int],
    *,
    generator: Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Integers uniform in [low, high) of ``size`` (int64), from ``generator``, on ``device``."""
    if isinstance(generator, StackedRandomGenerator):
        return generator.randint(low, high, size).to(device)
    if generator is None:
        return torch.randint(low, high, tuple(size), device=device)
    return torch.randint(low, high, tuple(size), generator=generator, device=_gen_device(generator)).to(
        device
    )


def mix_seed(param_seed: int, pipeline_seed: int) -> int:
    """The seed of one stage: its own ``seed`` param combined with the pipeline's ``seed``.

    ``param_seed * 1_000_003 + pipeline_seed`` (1 000 003 is prime), so changing either seed changes every
    random draw of the stage, and distinct (param, pipeline) pairs below 10^6 never collide.
    """
    return int(param_seed) * 1_000_003 + int(pipeline_seed)


def seed_batches(seeds: Sequence[int], max_batch_size: int) -> list[list[int]]:
    """Split ``seeds`` into consecutive batches of at most ``max_batch_size`` (order preserved)."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    seeds = list(seeds)
    return [seeds[i : i + max_batch_size] for i in range(0, len(seeds), max_batch_size)]


# --------------------------------------------------------------------------------------------------------
# Device RNG state and dropout synchronisation


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``module``; CPU for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def get_rng_state(device: torch.device | str) -> Tensor:
    """The default-generator state of ``device`` (the one dropout draws from on that device)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.get_rng_state()
    mod = torch.get_device_module(device.type)
    return mod.get_rng_state(device) if device.index is not None else mod.get_rng_state()


def set_rng_state(device: torch.device | str, state: Tensor) -> None:
    """Restore a state returned by :func:`get_rng_state`."""
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_rng_state(state)
        return
    mod = torch.get_device_module(device.type)
    if device.index is not None:
        mod.set_rng_state(state, device)
    else:
        mod.set_rng_state(state)


def _fork(device: torch.device):
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[], device_type="cpu")
    index = (
        device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    )
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def call_with_shared_rng(
    device: torch.device | str, online: Callable[[], T], target: Callable[[], U]
) -> tuple[T, U]:
    """Run ``online()`` then ``target()`` starting from the same RNG state of ``device``; return both results.

    The online call consumes the device RNG as usual (the global stream advances once per loss call, so
    masks still change from step to step); the target call runs inside ``torch.random.fork_rng`` after the
    state is reset to the one captured before the online call, so it draws exactly the same dropout masks and
    leaves the stream where the online call left it. Used by the CD / CT / iCT losses (CM Alg. 2, 3).
    """
    device = torch.device(device)
    state = get_rng_state(device)
    out_online = online()
    with _fork(device):
        set_rng_state(device, state)
        out_target = target()
    return out_online, out_target
