"""The loops: DDIM / flow inversion (``z_0 -> z_t``), the reverse process with Latent Drifting (``z_t -> z_0``), and
the stochastic alternative to inversion (noise ``z_0`` to level ``t``, SDEdit-like). Latents ``(B, C_lat, *spatial)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler

from ..drift import Drift, apply_step_drift, drift_noise
from ..schedulers import ddim_inversion_step, is_rflow, next_timesteps, rflow_inversion_step
from .noise import Generators, randn
from .steps import predict, scheduler_step, strength_timesteps

__all__ = ["InversionOutput", "denoise", "invert", "noise_latents"]


@dataclass
class InversionOutput:
    """Result of :func:`invert`.

    Attributes:
        latent: the noised latent ``z_t`` at the last inverted level, ``(B, C_lat, *latent_spatial)``.
        timesteps: the descending timesteps that denoise ``latent`` back to ``t=0`` (empty when strength is 0).
        clean_latent: ``z_0`` the inversion started from.
    """

    latent: torch.Tensor
    timesteps: torch.Tensor
    clean_latent: torch.Tensor


def _progress(steps: torch.Tensor, desc: str, verbose: bool):
    if not verbose:
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc=desc)


@torch.no_grad()
def invert(
    diffusion_model: Any,
    latents: torch.Tensor,
    scheduler: Any,
    conditioning: torch.Tensor | None = None,
    strength: float = 1.0,
    mode: str = "crossattn",
    drift: Drift = 0.0,
    cfg: float | None = None,
    cfg_fill_value: float = -1.0,
    verbose: bool = False,
) -> InversionOutput:
    """Deterministic DDIM inversion of ``latents`` (scaled ``z_0``; :func:`monai_ld.schedulers.ddim_inversion_step`),
    with an ``RFlowScheduler`` the flow ODE run backwards (:func:`monai_ld.schedulers.rflow_inversion_step`).

    Args:
        strength: fraction of the scheduler's inference steps to invert (1 = all the way to noise).
        drift: δ added after every inversion step (0 inverts the plain model; ``-δ`` is the exact inverse of
            drifted sampling).
        cfg: guidance scale during inversion (None: the plain conditional model, the usual choice).

    Returns:
        :class:`InversionOutput`; denoising ``latent`` over ``timesteps`` with the same condition returns close to
        ``clean_latent``.
    """
    rflow = is_rflow(scheduler)
    if not isinstance(scheduler, DDIMScheduler) and not rflow:
        raise ValueError(f"DDIM inversion needs a DDIMScheduler (flow inversion an RFlowScheduler), got "
                         f"{type(scheduler).__name__}; use abduction='noising'")
    timesteps = strength_timesteps(scheduler, strength)
    lower = next_timesteps(timesteps).flip(0)  # RFlow: the level each inversion step starts from
    z = latents
    for i, t in enumerate(_progress(timesteps.flip(0), "invert", verbose)):
        eps = predict(diffusion_model, z, t, conditioning, mode, cfg, cfg_fill_value)
        z = rflow_inversion_step(scheduler, eps, t, lower[i], z) if rflow else ddim_inversion_step(scheduler, eps, int(t), z)
        z = apply_step_drift(z, drift)
    return InversionOutput(latent=z, timesteps=timesteps, clean_latent=latents)


@torch.no_grad()
def denoise(
    diffusion_model: Any,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: Any,
    conditioning: torch.Tensor | None = None,
    mode: str = "crossattn",
    cfg: float | None = None,
    cfg_fill_value: float = -1.0,
    drift: Drift = 0.0,
    uncondition: torch.Tensor | None = None,
    generator: Generators | None = None,
    blend: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    trajectory: list[torch.Tensor] | None = None,
    verbose: bool = False,
) -> torch.Tensor:
    """The reverse process over ``timesteps`` (descending) from ``latents``: ``z ← step(ε̂, t, z) + δ`` each step.

    ``generator``: a stochastic step's noise (DDPM). ``blend=(mask, reference)``: after step ``i`` keep
    ``reference[i]`` where ``mask`` is 0 (a localised edit); ``trajectory``: a list that receives every step's latent.
    """
    # RFlow's step needs the level it lands on; a partial run (strength < 1) ends at 0 like a full one
    nexts = next_timesteps(timesteps) if is_rflow(scheduler) else [None] * len(timesteps)
    z = latents
    for i, t in enumerate(_progress(timesteps, "denoise", verbose)):
        out = predict(diffusion_model, z, t, conditioning, mode, cfg, cfg_fill_value, uncondition)
        z = apply_step_drift(scheduler_step(scheduler, out, t, z, nexts[i], generator), drift)
        if blend is not None:
            z = blend[0] * z + (1 - blend[0]) * blend[1][i]
        if trajectory is not None:
            trajectory.append(z)
    return z


def noise_latents(scheduler: Any, latents: torch.Tensor, timesteps: torch.Tensor, generator: Generators | None,
                  drift: Drift | None = None) -> torch.Tensor:
    """Stochastic abduction: ``add_noise(z_0, ε + δ, timesteps[0])`` with ``ε`` from ``generator`` (``drift`` None or 0:
    standard normal noise); ``latents`` itself when ``timesteps`` is empty."""
    if len(timesteps) == 0:
        return latents
    noise = randn(latents.shape, generator, latents.dtype, latents.device)
    t0 = timesteps[:1].to(latents.device).expand(latents.shape[0])
    return scheduler.add_noise(original_samples=latents, noise=drift_noise(noise, drift), timesteps=t0)
