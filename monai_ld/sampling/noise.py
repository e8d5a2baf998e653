"""Noise for inference from explicit ``torch.Generator`` objects; nothing here seeds, saves or restores torch's
global RNG, so concurrent edits with the same seed draw the same numbers.

A ``generator`` is one ``torch.Generator`` or a list of them, one per batch item: item ``i`` then draws what a batch
of one with ``generator[i]`` draws (N samples from seeds ``s, s+1, ...`` run as one batch equal the N single runs).
``None`` is PyTorch's convention: torch's default generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch

__all__ = ["Generators", "derive_generator", "generator_state", "randn", "restore_generator_state"]

Generators = Union[torch.Generator, Sequence[torch.Generator]]


def _as_list(generator: Generators | None) -> list[torch.Generator]:
    if generator is None:
        return []
    return list(generator) if isinstance(generator, (list, tuple)) else [generator]


def randn(shape: Any, generator: Generators | None, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Standard normal noise of ``shape`` ``(B, ...)``, drawn on the generator's device and moved to ``device``."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, dtype, device) for g in generator])
    return torch.randn(shape, generator=generator, dtype=dtype,
                       device="cpu" if generator is None else generator.device).to(device)


def derive_generator(device: Any) -> torch.Generator:
    """A fresh generator on ``device`` seeded by one draw of torch's default generator: what an edit given no generator
    uses, so ``torch.manual_seed`` still makes such a call reproducible while every draw after it is explicit."""
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, ())))


def generator_state(generator: Generators | None) -> list[torch.Tensor]:
    """The states of ``generator`` (one per generator of a list) for :func:`restore_generator_state`."""
    return [g.get_state() for g in _as_list(generator)]


def restore_generator_state(generator: Generators | None, state: list[torch.Tensor]) -> None:
    """Rewind ``generator`` to ``state``: a second run then draws exactly the noise the first one drew."""
    for g, s in zip(_as_list(generator), state):
        g.set_state(s)
