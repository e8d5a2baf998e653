"""Autoencoder training: an ``AutoencoderKL`` on (patches of) the images, written as its own checkpoint format."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import SimpleInferer
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel

from ..networks.model import atomic_torch_save
from ..networks.presets import autoencoder_config, build_autoencoder
from .losses import AutoencoderKLLoss
from .prepare_batch import AutoencoderPrepareBatch
from .runs import TrainingRun, TrainingStep, distributed_context, fit, sample_loader

__all__ = ["AUTOENCODER_FORMAT", "train_autoencoder", "load_autoencoder"]

AUTOENCODER_FORMAT = "monai_ld.autoencoder/1"


def read_autoencoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict of :func:`train_autoencoder` (``config``, ``state_dict``, ``record``), format checked."""
    ckpt = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != AUTOENCODER_FORMAT:
        raise ValueError(f"{path} is not a monai_ld autoencoder checkpoint (expected format {AUTOENCODER_FORMAT!r})")
    return ckpt


def load_autoencoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Read an autoencoder written by :func:`train_autoencoder` (``weights_only=True``); returns ``(model, record)``."""
    ckpt = read_autoencoder(path, map_location)
    model = build_autoencoder(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), dict(ckpt.get("record", {}))


def train_autoencoder(
    samples: Sequence[Mapping[str, Any]],
    output: str | os.PathLike,
    spatial_dims: int,
    size: str = "small",
    config: Mapping[str, Any] | None = None,
    max_iterations: int = 1000,
    batch_size: int = 8,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    perceptual_weight: float = 0.0,
    patch_size: Sequence[int] | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    seed: int = 0,
    device: str = "cpu",
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Train an ``AutoencoderKL`` (L1/L2 reconstruction + KL [+ perceptual]) and write ``output``.

    Args:
        samples: dicts with ``"image"`` ``(1, *spatial)`` in ``[0, 1]``.
        patch_size: train on random patches of this size (the autoencoder is convolutional; 3D on CPU needs this).
        work_dir: checkpoints and TensorBoard logs (default: ``<output>.work``).
    """
    from monai.transforms import RandSpatialCropd

    run = TrainingRun.at(output, work_dir, name="autoencoder", max_iterations=max_iterations, batch_size=batch_size,
                         lr=lr, checkpoint_every=checkpoint_every, resume=resume, seed=seed, device=device,
                         progress=progress)
    set_determinism(seed)
    cfg = dict(config) if config else autoencoder_config(spatial_dims, size)
    with distributed_context(device) as (rank, world):
        model = build_autoencoder(cfg).to(torch.device(device))
        net: torch.nn.Module = DistributedDataParallel(model) if world > 1 else model
        crop = RandSpatialCropd(keys="image", roi_size=tuple(patch_size), random_size=False) if patch_size else None
        if crop is not None:
            crop.set_random_state(seed + rank)
        loader = sample_loader(samples, run, world, rank, transform=crop)
        loss = AutoencoderKLLoss(kl_weight, "l1", perceptual_weight, spatial_dims)
        step = TrainingStep(loss, AutoencoderPrepareBatch(), SimpleInferer())
        record = fit(run, net, list(model.parameters()), loader, step, rank)
        if rank == 0:
            record.update(samples=len(samples), batch_size=batch_size, lr=lr, kl_weight=kl_weight, seed=seed,
                          patch_size=list(patch_size) if patch_size else None, world_size=world)
            atomic_torch_save({"format": AUTOENCODER_FORMAT, "config": cfg, "state_dict": model.cpu().state_dict(),
                               "record": record}, run.output)
    return run.output
