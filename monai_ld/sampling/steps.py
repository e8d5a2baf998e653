"""Single steps: one denoiser evaluation (with classifier-free guidance), one reverse step, one DDIM inversion step,
and the timesteps a partial edit runs over. Shapes: latents ``(B, C_lat, *spatial)``; cross-attention conditions
``(B, 1, dim)``; ``mode="concat"`` conditions ``(B, C_cond, *spatial)``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from ..schedulers.rflow import is_rflow
from .noise import Generators

__all__ = ["ddim_inversion_step", "predict", "scheduler_step", "strength_timesteps", "to_x0_eps"]


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


def _alpha_bar(scheduler: Any, timestep: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[timestep] if timestep >= 0 else scheduler.final_alpha_cumprod


def to_x0_eps(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
              alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂_0, ε̂)`` from a network output of ``prediction_type`` at a level with cumulative alpha ``alpha``."""
    if prediction_type == "epsilon":
        return (sample - (1 - alpha) ** 0.5 * model_output) / alpha**0.5, model_output
    if prediction_type == "v_prediction":
        return alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output, alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
    if prediction_type == "sample":
        return model_output, (sample - alpha**0.5 * model_output) / (1 - alpha) ** 0.5
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def ddim_inversion_step(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
    """Exact mirror of ``DDIMScheduler.step(·, timestep, ·)`` (η=0): from the level ``step`` lands on back to ``timestep``.

    MONAI's ``reversed_step(t)`` maps level ``t`` to ``t + T//N``, one step off the level ``step(t + T//N)`` lands
    on when the linspace timesteps are not multiples of ``T//N``, and reads ``alphas_cumprod[-T//N]`` at t=0; this
    uses the very alphas ``step`` used, so inverting then denoising closes up to the model's ε drift between levels.
    """
    t = int(timestep)
    prev_t = t - scheduler.num_train_timesteps // scheduler.num_inference_steps
    a_from, a_to = _alpha_bar(scheduler, prev_t), _alpha_bar(scheduler, t)
    x0, eps = to_x0_eps(str(scheduler.prediction_type), model_output, sample, a_from)
    if scheduler.clip_sample:
        x0 = torch.clamp(x0, scheduler.clip_sample_values[0], scheduler.clip_sample_values[1])
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps
