"""Rectified flow (MONAI's ``RFlowScheduler``): the timestep bookkeeping its ``step`` needs, and flow inversion.

MONAI's flow interpolates ``z_t = (1 - t/T)·z_0 + (t/T)·ε`` (``add_noise``), the network predicts the velocity
``v = z_0 - ε`` and a sampling step is the Euler step ``z_next = z_t + v̂(z_t, t)·(t - next)/T``. Unlike DDPM-style
schedulers its ``step`` needs the NEXT timestep (without it, it assumes the uniform ``1/N``, wrong for rounded or
transformed timesteps), which MONAI's own inferer passes only when ``isinstance(scheduler, RFlowScheduler)``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import RFlowScheduler

__all__ = ["is_rflow", "next_timesteps", "following_timestep", "rflow_inversion_step"]


def is_rflow(scheduler: Any) -> bool:
    """True for a MONAI ``RFlowScheduler``, also when wrapped (an object whose ``.scheduler`` is one)."""
    return isinstance(scheduler, RFlowScheduler) or isinstance(getattr(scheduler, "scheduler", None), RFlowScheduler)


def next_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """``(N,)`` descending timesteps -> the timestep each step lands on, ``0`` after the last (as MONAI's inferer)."""
    return torch.cat((timesteps[1:], torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device)))


def following_timestep(timesteps: torch.Tensor, timestep: Any) -> torch.Tensor:
    """The entry after ``timestep`` in the descending ``timesteps`` (``0`` after the last one).

    Raises ``ValueError`` when ``timestep`` is not one of them (then the step size would be a guess).
    """
    hit = (timesteps == torch.as_tensor(timestep, device=timesteps.device).to(timesteps.dtype)).nonzero()
    if hit.numel() == 0:
        raise ValueError(f"timestep {timestep} is not among the scheduler's timesteps; pass next_timestep explicitly")
    return next_timesteps(timesteps)[int(hit[0, 0])]


def rflow_inversion_step(scheduler: Any, model_output: torch.Tensor, timestep: Any, prev_timestep: Any,
                         sample: torch.Tensor) -> torch.Tensor:
    """Mirror of ``RFlowScheduler.step(v̂, timestep, ·, next_timestep=prev_timestep)``: from the level that step
    lands on (``prev_timestep``, lower) back up to ``timestep``.

    ``model_output`` is ``v̂(sample, timestep)``, the velocity at the target level evaluated at the current sample
    (as DDIM inversion evaluates ``ε̂(z_{t-1}, t)``), so that inverting then sampling with the same velocities
    closes exactly and with a real network up to how much ``v̂`` changes between neighbouring levels.
    Shapes: ``model_output`` and ``sample`` ``(B, C, *spatial)``; returns the same shape.
    """
    # the very dt ``step`` computes (it truncates next_timestep to an int, which matters for float timesteps)
    dt = float(torch.as_tensor(timestep) - int(prev_timestep)) / scheduler.num_train_timesteps
    return sample - model_output * dt
