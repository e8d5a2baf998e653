"""Losses for the first stage (autoencoder)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AutoencoderKLLoss", "kl_divergence"]


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


class AutoencoderKLLoss(nn.Module):
    """``recon + kl_weight * KL (+ perceptual_weight * perceptual)`` for ``AutoencoderKL``'s ``(recon, mu, sigma)``.

    Args:
        kl_weight: weight of the KL term (MONAI tutorials use ~1e-6).
        recon: ``"l1"`` or ``"l2"``.
        perceptual_weight: > 0 adds MONAI's ``PerceptualLoss``, whose pretrained weights must already be in the
            local torch hub cache (nothing is downloaded here); when they are absent this fails with a clear error.
        spatial_dims: needed for the perceptual loss.
    """

    def __init__(self, kl_weight: float = 1e-6, recon: str = "l1", perceptual_weight: float = 0.0, spatial_dims: int = 2):
        super().__init__()
        if recon not in ("l1", "l2"):
            raise ValueError(f"recon must be 'l1' or 'l2', got {recon!r}")
        self.kl_weight, self.recon, self.perceptual_weight = float(kl_weight), recon, float(perceptual_weight)
        self.perceptual = None
        if self.perceptual_weight > 0:
            try:
                from monai.losses import PerceptualLoss

                self.perceptual = PerceptualLoss(spatial_dims=spatial_dims, network_type="squeeze", is_fake_3d=spatial_dims == 3)
            except Exception as e:  # no network here: the weights would have to be downloaded
                raise RuntimeError(
                    "perceptual loss needs pretrained network weights that are not available offline "
                    f"({type(e).__name__}: {e}); set perceptual_weight=0 or place the weights in the torch hub cache"
                ) from e

    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        recon, z_mu, z_sigma = outputs
        rec = (recon - target).abs().mean() if self.recon == "l1" else (recon - target).pow(2).mean()
        loss = rec + self.kl_weight * kl_divergence(z_mu, z_sigma)
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * self.perceptual(recon.float(), target.float())
        return loss
