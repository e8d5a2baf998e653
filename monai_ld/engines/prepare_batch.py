"""Prepare-batch callables for MONAI engines: autoencoder pairs and latent diffusion with LD forward drift."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch, PrepareBatch, default_prepare_batch

from ..conditioning import NULL_VALUE
from ..drift import DriftTarget, drift_noise, forward_drift

__all__ = ["AutoencoderPrepareBatch", "LatentDriftPrepareBatch"]


class AutoencoderPrepareBatch(PrepareBatch):
    """``(image, image, (), {})``: the autoencoder reconstructs its own input."""

    def __call__(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        return images, images, (), {}


class LatentDriftPrepareBatch(DiffusionPrepareBatch):
    """MONAI's ``DiffusionPrepareBatch`` with Latent Drifting and condition dropout.

    For a batch ``{"image": z_0 (B, C, *spatial), condition_name: (B, 1, dim)}`` (latents already scaled) it returns
    ``(z_0, target, (), {"noise": ε + δ, "timesteps": t, "condition": c})`` for MONAI's ``DiffusionInferer``, which
    then computes ``add_noise(z_0, ε + δ, t)``; ``target`` follows ``drift_target`` and the scheduler's prediction type.

    Paired counterfactual supervision: a batch may also hold ``counterfactual_name`` (B, C, *spatial), the latent of the
    same subject under the row's condition while ``image`` is the subject under other attributes (a longitudinal
    pair; a row without a partner carries its own ``image``). The network then sees the factual's noisy latent
    ``z_t = sqrt(ᾱ) z_0 + sqrt(1 - ᾱ) ε`` under the counterfactual's condition and must predict the noise that takes the
    counterfactual there, ``ε + sqrt(ᾱ / (1 - ᾱ)) (z_0 - z_cf)``: its clean-latent estimate is the counterfactual,
    abduction (the noise) and action (the condition) as the edit does them. Such rows keep their condition (no dropout:
    the null condition's target is the population's, not one subject's). ε-prediction only.

    Args:
        scheduler: the training scheduler (``num_train_timesteps``, ``prediction_type``, ``add_noise``).
        drift: δ of the forward process (0 = plain training).
        drift_target: ``"shifted"`` (ε + δ) or ``"unshifted"`` (ε), see :class:`monai_ld.drift.DriftTarget`.
        condition_name: batch key of the condition; None for unconditional training.
        condition_dropout: probability of replacing a row's condition by the null code (classifier-free guidance).
        generator: optional RNG for noise, timesteps and dropout (reproducible runs).
        counterfactual_name: batch key of the counterfactual latent (paired rows), or None.
    """

    def __init__(
        self,
        scheduler: Any,
        drift: float = 0.0,
        drift_target: DriftTarget | str = DriftTarget.SHIFTED,
        condition_name: str | None = "condition",
        condition_dropout: float = 0.1,
        generator: torch.Generator | None = None,
        counterfactual_name: str | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=int(scheduler.num_train_timesteps), condition_name=condition_name)
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {condition_dropout}")
        self.scheduler = scheduler
        self.drift = float(drift)
        self.drift_target = DriftTarget(drift_target)
        self.condition_dropout = float(condition_dropout)
        self.generator = generator
        self.counterfactual_name = counterfactual_name
        if counterfactual_name is not None and getattr(scheduler, "prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"paired counterfactual rows need an epsilon-prediction scheduler, got {scheduler.prediction_type!r}")

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.shape, generator=self.generator, dtype=images.dtype).to(images.device)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (images.shape[0],), generator=self.generator).to(images.device)

    def __call__(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        latents, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        _, target = forward_drift(self.scheduler, latents, noise, timesteps, self.drift, self.drift_target)
        infer_kwargs: dict[str, Any] = {"noise": drift_noise(noise, self.drift), "timesteps": timesteps}
        paired = torch.zeros(latents.shape[0], dtype=torch.bool)
        if self.counterfactual_name is not None and isinstance(batchdata, Mapping) and self.counterfactual_name in batchdata:
            shift = latents - batchdata[self.counterfactual_name].to(device=latents.device, dtype=latents.dtype)
            ab = self.scheduler.alphas_cumprod.to(latents.device)[timesteps].to(latents.dtype)
            target = target + (ab / (1 - ab)).sqrt().reshape(-1, *[1] * (latents.ndim - 1)) * shift
            paired = shift.flatten(1).abs().amax(1).cpu() > 0
        if self.condition_name is not None and isinstance(batchdata, Mapping):
            cond = batchdata[self.condition_name].to(device=device, non_blocking=non_blocking)
            if cond.ndim == 2:
                cond = cond.unsqueeze(1)
            if self.condition_dropout > 0:
                drop = (torch.rand(cond.shape[0], generator=self.generator) < self.condition_dropout) & ~paired
                cond = torch.where(drop.reshape(-1, 1, 1).to(cond.device), torch.full_like(cond, NULL_VALUE), cond)
            infer_kwargs["condition"] = cond
        return latents, target, (), infer_kwargs
