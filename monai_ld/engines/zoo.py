"""LD fine-tuning of a model-zoo bundle's diffusion network (full / embedding / LoRA) on cached latents.

A plain, seeded PyTorch loop (no ignite state to resume): the site data of a fine-tune is small, and the loop has to
call networks whose conditioning differs per bundle (see :class:`monai_ld.networks.zoo.ZooDenoiser`). The result is
written in the layout of the bundle's own weights file, so the bundle's config loads it unchanged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..conditioning import NULL_VALUE
from ..drift import DriftTarget, forward_drift
from ..networks.model import atomic_torch_save
from ..networks.zoo import ZooBundle, ZooDenoiser, unet_state_container
from .adapters import merge_adapters, prepare_finetune

__all__ = ["finetune_zoo"]

logger = logging.getLogger("monai_ld.train")


def finetune_zoo(
    bundle: ZooBundle,
    latents: torch.Tensor,
    scheduler: Any,
    output: str | os.PathLike,
    conditions: torch.Tensor | None = None,
    scheme: str = "lora",
    lora_rank: int = 4,
    cross_attention: bool = True,
    concat: bool = False,
    static_inputs: dict[str, torch.Tensor] | None = None,
    drift: float = 0.0,
    drift_target: DriftTarget | str = DriftTarget.SHIFTED,
    max_iterations: int = 500,
    batch_size: int = 4,
    lr: float = 1e-4,
    condition_dropout: float = 0.0,
    loss: str = "mse",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Path:
    """Fine-tune ``bundle.unet`` with LD forward drift and write its weights to ``output``.

    Args:
        bundle: from :func:`monai_ld.networks.load_zoo_bundle`.
        latents: scaled latents ``z_0`` ``(N, C_lat, *spatial)`` (``E(x) * bundle.scale_factor``, encoded once).
        scheduler: the training scheduler (MONAI DDPM/DDIM or ``RFlowScheduler``; its target is built by
            :func:`monai_ld.drift.forward_drift`, e.g. ``z_0 - ε'`` for RFlow as MAISI trains).
        conditions: ``(N, 1, dim)`` (or ``(N, dim)``) contexts in the network's own convention, or None.
        scheme: ``"full"``, ``"embedding"`` (cross-attention networks only) or ``"lora"``.
        cross_attention, concat, static_inputs: how the network takes its condition (:class:`ZooDenoiser`).
        drift, drift_target: LD forward drift δ and target (0 = plain fine-tuning).
        condition_dropout: probability of the null condition (-1) per row, for classifier-free guidance; 0 keeps
            the bundle's own training convention when it had no null condition.
        loss: ``"mse"`` (brain LDM) or ``"l1"`` (MAISI).

    Returns:
        ``output``; adapters are merged first, so it is a plain state dict in the bundle's layout, and a record of
        the run is attached to ``bundle.meta["finetune"]``.
    """
    if loss not in ("mse", "l1"):
        raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
    if conditions is not None:
        conditions = conditions.reshape(conditions.shape[0], 1, -1) if conditions.ndim == 2 else conditions
        if conditions.shape[0] != latents.shape[0]:
            raise ValueError(f"{conditions.shape[0]} conditions for {latents.shape[0]} latents")
    dev = torch.device(device)
    unet = bundle.unet.to(dev).train()
    params = prepare_finetune(unet, scheme, lora_rank)
    net = ZooDenoiser(unet, cross_attention, concat, static_inputs)
    opt = torch.optim.AdamW(params, lr=lr)
    crit = torch.nn.functional.mse_loss if loss == "mse" else torch.nn.functional.l1_loss
    g = torch.Generator().manual_seed(seed)
    n, t_max, losses = latents.shape[0], int(scheduler.num_train_timesteps), []
    for it in range(int(max_iterations)):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        z0 = latents[idx].to(dev)
        noise = torch.randn(z0.shape, generator=g).to(dev)
        t = torch.randint(0, t_max, (z0.shape[0],), generator=g).to(dev)
        noisy, target = forward_drift(scheduler, z0, noise, t, drift, drift_target)
        cond = None
        if conditions is not None:
            cond = conditions[idx].to(dev)
            if condition_dropout > 0:
                drop = (torch.rand(cond.shape[0], generator=g) < condition_dropout).reshape(-1, 1, 1).to(dev)
                cond = torch.where(drop, torch.full_like(cond, NULL_VALUE), cond)
        loss_value = crit(net(noisy, t, cond).float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss_value.backward()
        opt.step()
        losses.append(loss_value.item())
    merge_adapters(unet)
    unet.eval()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    atomic_torch_save(unet_state_container(bundle.checkpoint, state), output)
    bundle.meta["finetune"] = {"scheme": scheme, "lora_rank": lora_rank if scheme == "lora" else None, "drift": float(drift),
                               "drift_target": str(DriftTarget(drift_target)), "iterations": int(max_iterations),
                               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                               "output": str(output)}
    logger.info("zoo fine-tune %s: %d iterations, loss %.4g -> %.4g", scheme, max_iterations, losses[0], losses[-1])
    return output
