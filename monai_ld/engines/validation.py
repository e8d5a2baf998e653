"""What a campaign checkpoint is validated on: reconstruction and the autoencoder's ceiling on ground-truth pairs,
the denoising loss at fixed noise, and whether the UNet moves a latent the way the intervention does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..conditioning import NULL_VALUE

__all__ = ["autoencoder_metrics", "denoising_loss", "condition_alignment"]


@torch.no_grad()
def autoencoder_metrics(ae: torch.nn.Module, val_images: torch.Tensor, pairs: Sequence[Mapping[str, Any]]) -> dict:
    """Val reconstruction L1 and, on val's ground-truth pairs, the ceiling the autoencoder allows: the input's L1 to
    the truth next to ``x + D(E(gt)) - D(E(x))`` (anywhere, and kept inside the true change grown by 2 voxels, as
    ``benchmarks/gt_check.py --ceilings`` computes it)."""
    dev = next(ae.parameters()).device

    def auto(x):
        return torch.cat([ae.decode(ae.encode(x[i : i + 1].to(dev))[0]).cpu() for i in range(x.shape[0])])

    out = {"val_recon_l1": float((auto(val_images) - val_images).abs().mean())}
    if pairs:
        x = torch.stack([p["image"] for p in pairs]).float()
        gt = torch.stack([p["ground_truth"] for p in pairs]).float()
        oracle = x + auto(gt) - auto(x)
        grow = torch.nn.functional.max_pool3d if x.ndim == 5 else torch.nn.functional.max_pool2d
        region = grow(((gt - x).abs() > 0.01).float(), kernel_size=5, stride=1, padding=2)
        out.update(val_input_l1=float((x - gt).abs().mean()), val_oracle_l1=float((oracle - gt).abs().mean()),
                   val_oracle_region_l1=float((x + region * (oracle - x) - gt).abs().mean()))
    return out


def denoising_loss(unet: torch.nn.Module, scheduler: Any, val: Sequence[Mapping[str, Any]], seed: int = 1234) -> dict:
    """Val MSE of the noise prediction at fixed noise and 4 fixed timesteps per latent, under the true condition:
    comparable across checkpoints (the training loss is not: random timesteps, dropped conditions).

    ``val_condition_gain`` is the same loss under the null condition (the one classifier-free guidance contrasts
    with) minus the loss under the true one: above 0 only once the network uses the attributes, which an edit needs."""
    g = torch.Generator().manual_seed(seed)
    dev = next(unet.parameters()).device
    z = torch.stack([v["image"] for v in val]).to(dev)
    cond = torch.stack([v["condition"] for v in val]).to(dev)
    losses, null = [], []
    with torch.no_grad():
        for t in (50, 250, 500, 750):
            noise = torch.randn(z.shape, generator=g).to(dev)  # drawn on the CPU: the same numbers on any device
            ts = torch.full((z.shape[0],), t, dtype=torch.long, device=dev)
            noisy = scheduler.add_noise(z, noise, ts)
            losses.append(float(((unet(noisy, timesteps=ts, context=cond) - noise) ** 2).mean()))
            null.append(float(((unet(noisy, timesteps=ts, context=torch.full_like(cond, NULL_VALUE)) - noise) ** 2).mean()))
    return {"val_loss": sum(losses) / len(losses), **{f"val_loss_t{t}": v for t, v in zip((50, 250, 500, 750), losses)},
            "val_condition_gain": (sum(null) - sum(losses)) / len(losses)}


def condition_alignment(unet: torch.nn.Module, scheduler: Any, pairs: Mapping[str, Any],
                        timesteps: Sequence[int] = (100, 250, 500), seed: int = 4321) -> dict:
    """Does the network move the image the way the intervention does? ``pairs``: val ground-truth pairs as latents,
    ``{"z": (N, C, *spatial) factual, "true": (N, C, *spatial) E(exact counterfactual) - E(factual), "source",
    "target": (N, 1, dim) condition codes, "groups": [intervened attribute per pair]}``.

    At each ``t``, the factual latent is noised (fixed noise) and the UNet's clean-latent estimate under the target
    minus under the source condition is the change it attributes to the intervention. Returns the mean cosine of that
    change with the true one per group (``val_align_<attribute>``; 0 for a network ignoring the attributes, and for
    one whose change goes elsewhere) and ``val_change_ratio`` (median norm of the model's change over the true one's)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(unet.parameters()).device
    z, true = pairs["z"].to(dev), pairs["true"].to(dev)
    cos = torch.zeros(z.shape[0], device=dev)
    ratio = torch.zeros(z.shape[0], device=dev)
    with torch.no_grad():
        for t in timesteps:
            ab = scheduler.alphas_cumprod[t].item()
            noise = torch.randn(z.shape, generator=g).to(dev)
            ts = torch.full((z.shape[0],), t, dtype=torch.long, device=dev)
            noisy = scheduler.add_noise(z, noise, ts)
            d_eps = unet(noisy, timesteps=ts, context=pairs["target"].to(dev)) - unet(noisy, timesteps=ts,
                                                                                       context=pairs["source"].to(dev))
            change = (-((1.0 - ab) / ab) ** 0.5 * d_eps).flatten(1)  # x0 = (z_t - sqrt(1 - ab) eps) / sqrt(ab)
            cos += torch.nn.functional.cosine_similarity(change, true.flatten(1), dim=1) / len(timesteps)
            ratio += change.norm(dim=1) / true.flatten(1).norm(dim=1).clamp_min(1e-12) / len(timesteps)
    out = {f"val_align_{name}": float(cos[[i for i, n in enumerate(pairs["groups"]) if n == name]].mean())
           for name in sorted(set(pairs["groups"]))}
    return {**out, "val_change_ratio": float(ratio.median())}
