"""Single steps: one denoiser evaluation (with classifier-free guidance), one reverse step, and the timesteps a
partial edit runs over (the inversion steps are scheduler arithmetic: :mod:`monai_ld.schedulers`).

Shapes: latents ``(B, C_lat, *spatial)``; cross-attention conditions ``(B, 1, dim)``; ``mode="concat"`` conditions
``(B, C_cond, *spatial)``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import DDPMScheduler

from ..schedulers.rflow import is_rflow
from .noise import Generators

__all__ = ["predict", "scheduler_step", "strength_timesteps"]


def strength_timesteps(scheduler: Any, strength: float) -> torch.Tensor:
    """The last ``round(strength * N)`` of the scheduler's ``N`` descending inference timesteps.

    ``strength=1`` inverts to pure noise, ``0`` does nothing.
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    timesteps = scheduler.timesteps
    n = len(timesteps)
    k = int(round(float(strength) * n))
    return timesteps[n - k :]


def predict(
    diffusion_model: Any,
    latents: torch.Tensor,
    timestep: Any,
    conditioning: torch.Tensor | None,
    mode: str = "crossattn",
    cfg: float | None = None,
    cfg_fill_value: float = -1.0,
    uncondition: torch.Tensor | None = None,
) -> torch.Tensor:
    """ε̂ (or v̂) for ``latents`` at ``timestep``, guided as ``ε_u + w (ε_c - ε_u)`` when ``cfg`` is set.

    ``uncondition`` defaults to the conditioning filled with ``cfg_fill_value`` (MONAI's convention). The timestep
    goes in as MONAI's sampling loop passes it (a float tensor of one element), so results match it bit for bit.
    """
    t = torch.as_tensor(timestep, device=latents.device).reshape(1).float()
    if cfg is not None and conditioning is not None:
        if uncondition is None:
            uncondition = torch.full_like(conditioning, cfg_fill_value)
        model_input = torch.cat([latents] * 2, dim=0)
        cond = torch.cat([uncondition, conditioning], dim=0)
    else:
        model_input, cond = latents, conditioning
    if mode == "concat" and cond is not None:
        out = diffusion_model(torch.cat([model_input, cond], dim=1), timesteps=t, context=None)
    else:
        out = diffusion_model(model_input, timesteps=t, context=cond)
    if cfg is not None and conditioning is not None:
        out_u, out_c = out.chunk(2)
        out = out_u + cfg * (out_c - out_u)
    return out


def scheduler_step(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
                   next_timestep: Any = None, generator: Generators | None = None) -> torch.Tensor:
    """``z_{t-1}`` from ``z_t`` (no drift: the caller adds δ with :func:`monai_ld.drift.apply_step_drift`).

    RFlow's Euler step takes the level it lands on (``next_timestep``); DDPM's step (the one MONAI step that draws
    noise here: DDIM runs with η = 0, PNDM and RFlow are deterministic) draws from ``generator``, item by item for a
    list of generators (the step is elementwise, so only the noise differs from a batched step).
    """
    if is_rflow(scheduler):
        return scheduler.step(model_output, timestep, sample, next_timestep)[0]
    if not isinstance(getattr(scheduler, "scheduler", scheduler), DDPMScheduler):
        return scheduler.step(model_output, timestep, sample)[0]
    if isinstance(generator, (list, tuple)):
        return torch.cat([scheduler.step(model_output[i : i + 1], timestep, sample[i : i + 1], generator=g)[0]
                          for i, g in enumerate(generator)])
    return scheduler.step(model_output, timestep, sample, generator=generator)[0]
