"""DiffEdit (Couairon et al., 2022): where the condition changes the noise prediction, as a latent mask and as its
image-space weight."""

from __future__ import annotations

from typing import Any

import torch

from .noise import Generators, randn
from .steps import predict

__all__ = ["edit_mask", "mask_to_image"]


@torch.no_grad()
def edit_mask(
    diffusion_model: Any,
    latents: torch.Tensor,
    scheduler: Any,
    source_condition: torch.Tensor,
    target_condition: torch.Tensor,
    timestep: Any,
    threshold: float = 0.5,
    samples: int = 4,
    mode: str = "crossattn",
    generator: Generators | None = None,
) -> torch.Tensor:
    """DiffEdit's mask for ``latents`` ``(B, C, *spatial)``: noised to ``timestep`` with ``samples`` draws from
    ``generator``, the channel-mean ``|ε(z, target) - ε(z, source)|``, averaged over the draws and divided by its
    per-sample maximum, is thresholded at ``threshold`` (in ``(0, 1)``; higher = smaller region).

    Returns a ``{0, 1}`` mask ``(B, 1, *spatial)``.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"mask threshold must be in (0, 1) (DiffEdit uses 0.5), got {threshold}")
    if int(samples) < 1:
        raise ValueError(f"mask samples must be >= 1, got {samples}")
    t = torch.as_tensor(timestep, device=latents.device).reshape(1).long().expand(latents.shape[0])
    acc = torch.zeros((latents.shape[0], 1, *latents.shape[2:]), device=latents.device)
    for _ in range(int(samples)):
        noise = randn(latents.shape, generator, latents.dtype, latents.device)
        z = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=t)
        e_t = predict(diffusion_model, z, t[0], target_condition, mode)
        e_s = predict(diffusion_model, z, t[0], source_condition, mode)
        acc += (e_t - e_s).abs().mean(1, keepdim=True)
    peak = acc.flatten(1).amax(1).clamp_min(1e-12).reshape(-1, *[1] * (acc.ndim - 1))
    return (acc / peak > float(threshold)).to(latents.dtype)


def mask_to_image(mask: torch.Tensor, spatial_size: Any) -> torch.Tensor:
    """A latent edit mask ``(B, 1, *latent)`` as an image-space weight ``(B, 1, *spatial_size)`` in ``[0, 1]``: dilated
    by one latent voxel (the decoder's local reach), then linearly upsampled (a soft edge one latent voxel wide)."""
    nd = mask.ndim - 2
    pool = torch.nn.functional.max_pool2d if nd == 2 else torch.nn.functional.max_pool3d
    grown = pool(mask.float(), kernel_size=3, stride=1, padding=1)
    return torch.nn.functional.interpolate(grown, size=tuple(spatial_size), mode="bilinear" if nd == 2 else "trilinear",
                                           align_corners=False).to(mask.dtype)
