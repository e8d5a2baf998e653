"""Latent diffusion training with Latent Drifting: a conditional UNet on cached latents (:func:`train_diffusion`) and
fine-tuning a trained :class:`ConditionalLDM` with a scheme (:func:`finetune`); both write a ``ConditionalLDM``."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.inferers import DiffusionInferer
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel

from ..conditioning import AttributeEncoder
from ..networks.model import ConditionalLDM
from ..networks.presets import build_scheduler, scheduler_config, unet_config
from .adapters import merge_adapters, prepare_finetune
from .autoencoder import read_autoencoder
from .prepare_batch import LatentDriftPrepareBatch
from .runs import TrainingRun, TrainingStep, distributed_context, fit, sample_loader

__all__ = ["DiffusionJob", "encode_latents", "scale_factor_from_latents", "train_diffusion", "finetune"]


@torch.no_grad()
def encode_latents(autoencoder: torch.nn.Module, samples: Sequence[Mapping[str, Any]], batch_size: int = 8,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Posterior means ``(N, C_lat, *latent_spatial)`` of all samples' images (the latent cache for 3D training)."""
    autoencoder = autoencoder.to(device).eval()
    chunks = []
    for i in range(0, len(samples), batch_size):
        x = torch.stack([s["image"] for s in samples[i : i + batch_size]]).to(device)
        chunks.append(autoencoder.encode(x)[0].cpu())
    return torch.cat(chunks)


def scale_factor_from_latents(latents: torch.Tensor) -> float:
    """``1 / std(latents)``: unit-variance latents for the diffusion model (as in Rombach et al. / MONAI tutorials)."""
    std = float(latents.float().std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"cannot compute a scale factor: latent std is {std}")
    return 1.0 / std


@dataclass(frozen=True)
class DiffusionJob:
    """A diffusion run and its objective: conditions dropped to the null code with ``condition_dropout``
    (classifier-free guidance), LD forward drift ``drift`` toward ``drift_target`` (see
    :class:`LatentDriftPrepareBatch`), latents scaled by ``scale_factor`` (``None``: ``1/std`` of the latents)."""

    run: TrainingRun
    condition_dropout: float
    drift: float
    drift_target: str
    scale_factor: float | None


def _latent_samples(autoencoder: torch.nn.Module, samples: Sequence[Mapping[str, Any]], device: str,
                    scale_factor: float | None) -> tuple[list[dict], float]:
    latents = encode_latents(autoencoder, samples, device=device)
    sf = scale_factor_from_latents(latents) if scale_factor is None else float(scale_factor)
    return [{"image": (z * sf), "condition": s["condition"]} for z, s in zip(latents, samples)], sf


def _train_unet(model: ConditionalLDM, params: Sequence[torch.nn.Parameter], samples: Sequence[Mapping[str, Any]],
                job: DiffusionJob, before_save: Callable[[ConditionalLDM], None] | None = None) -> Path:
    """Train ``params`` of ``model.unet`` on the samples' latents; rank 0 writes ``model`` to ``job.run.output`` with
    the run's record in its meta (``before_save`` first, e.g. merging adapters)."""
    run = job.run
    if any("condition" not in s for s in samples):
        raise ValueError("every training sample needs a 'condition' (run preprocessing with the attribute encoder)")
    set_determinism(run.seed)
    with distributed_context(run.device) as (rank, world):
        latents, sf = _latent_samples(model.autoencoder, samples, run.device, job.scale_factor)
        model.scale_factor = sf
        unet = model.unet.to(torch.device(run.device)).train()
        net: torch.nn.Module = DistributedDataParallel(unet) if world > 1 else unet
        scheduler = build_scheduler(model.scheduler_config)
        gen = torch.Generator().manual_seed(run.seed + rank)
        prepare = LatentDriftPrepareBatch(scheduler, drift=job.drift, drift_target=job.drift_target,
                                          condition_dropout=job.condition_dropout, generator=gen)
        loader = sample_loader(latents, run, world, rank)
        step = TrainingStep(torch.nn.MSELoss(), prepare, DiffusionInferer(scheduler))
        record = fit(run, net, params, loader, step, rank)
        if rank == 0:
            if before_save is not None:
                before_save(model)
            record.update(samples=len(samples), batch_size=run.batch_size, lr=run.lr,
                          condition_dropout=job.condition_dropout, drift=job.drift, drift_target=job.drift_target,
                          seed=run.seed, world_size=world, scale_factor=sf)
            model.meta = {**model.meta, f"{run.name}_record": record}
            model.drift_target = job.drift_target
            model.cpu().save(run.output)
    return run.output


def train_diffusion(
    samples: Sequence[Mapping[str, Any]],
    autoencoder: str | os.PathLike,
    output: str | os.PathLike,
    attributes: AttributeEncoder | Sequence[Mapping[str, Any]],
    size: str = "small",
    unet: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    max_iterations: int = 5000,
    batch_size: int = 16,
    lr: float = 2.5e-4,
    condition_dropout: float = 0.15,
    drift: float = 0.0,
    drift_target: str = "shifted",
    scale_factor: float | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    seed: int = 0,
    device: str = "cpu",
    work_dir: str | os.PathLike | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    ema_decay: float | None = None,
) -> Path:
    """Train a conditional diffusion UNet on cached latents of a trained autoencoder; write a :class:`ConditionalLDM`.

    The latents are encoded once (posterior means), scaled by ``1/std`` unless ``scale_factor`` is given; conditions
    are dropped to the null code with ``condition_dropout`` (classifier-free guidance); ``drift`` ≠ 0 trains with LD
    forward drift (see :class:`LatentDriftPrepareBatch`); ``ema_decay`` saves an exponential moving average of the UNet
    weights instead of the last iterate.
    """
    run = TrainingRun.at(output, work_dir, name="diffusion", max_iterations=max_iterations, batch_size=batch_size,
                         lr=lr, checkpoint_every=checkpoint_every, resume=resume, seed=seed, device=device,
                         progress=progress, ema_decay=ema_decay)
    ae_ckpt = read_autoencoder(autoencoder)  # read once: the config sizes the model, the weights fill it
    enc = attributes if isinstance(attributes, AttributeEncoder) else AttributeEncoder(attributes)
    ae_cfg = ae_ckpt["config"]
    ucfg = dict(unet) if unet else unet_config(int(ae_cfg["spatial_dims"]), int(ae_cfg.get("latent_channels", 3)), enc.dim, size)
    model = ConditionalLDM(ae_cfg, ucfg, enc, scheduler=scheduler or scheduler_config(), drift=drift,
                           drift_target=drift_target, meta=meta)
    model.autoencoder.load_state_dict(ae_ckpt["state_dict"])
    return _train_unet(model, list(model.unet.parameters()), samples,
                       DiffusionJob(run, condition_dropout, drift, drift_target, scale_factor))


def finetune(
    samples: Sequence[Mapping[str, Any]],
    base_model: str | os.PathLike,
    output: str | os.PathLike,
    scheme: str = "full",
    lora_rank: int = 4,
    max_iterations: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-4,
    condition_dropout: float = 0.15,
    drift: float = 0.0,
    drift_target: str = "shifted",
    checkpoint_every: int = 250,
    resume: bool = True,
    seed: int = 0,
    device: str = "cpu",
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    ema_decay: float | None = None,
) -> Path:
    """Fine-tune a trained :class:`ConditionalLDM` on new samples with a scheme, with or without LD.

    Schemes (:func:`monai_ld.engines.adapters.prepare_finetune`): ``"full"`` (whole UNet), ``"embedding"`` (only a
    shared condition-embedding matrix; the textual-inversion analogue), ``"lora"`` (low-rank attention adapters).
    Adapters are merged back before saving, so the result is a plain checkpoint. The base model's scale factor is
    kept (the autoencoder is unchanged).
    """
    run = TrainingRun.at(output, work_dir, name=f"finetune_{scheme}", max_iterations=max_iterations,
                         batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, resume=resume, seed=seed,
                         device=device, progress=progress, ema_decay=ema_decay)
    model = ConditionalLDM.load(base_model)
    params = prepare_finetune(model.unet, scheme, lora_rank)
    model.drift = float(drift)
    model.meta = {**model.meta, "finetune": {"base": str(base_model), "scheme": scheme, "lora_rank": lora_rank if scheme == "lora" else None}}
    job = DiffusionJob(run, condition_dropout, drift, drift_target, model.scale_factor)
    return _train_unet(model, params, samples, job, before_save=lambda m: merge_adapters(m.unet))
