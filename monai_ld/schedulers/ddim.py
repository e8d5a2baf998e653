"""DDIM (η = 0) run backwards: the inversion step that mirrors MONAI's ``DDIMScheduler.step`` exactly, and the
conversion of a network output to ``(x̂_0, ε̂)`` it needs (the diffusers drift reuses it)."""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler

__all__ = ["ddim_inversion_step", "to_x0_eps"]


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
