"""Training jobs on MONAI's ``SupervisedTrainer``: autoencoder, latent diffusion (with LD), fine-tuning.

Each job takes preprocessed samples (dicts with ``"image"`` ``(1, *spatial)`` and ``"condition"`` ``(1, dim)``; see
:func:`preprocess`), trains with MONAI/ignite handlers (progress bar, TensorBoard, iteration checkpoints that a
re-run resumes from), and writes its result atomically. Under ``torchrun`` (``WORLD_SIZE > 1``) each job trains
with DistributedDataParallel (gloo on CPU, NCCL on GPU), and rank 0 writes.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from ignite.engine import Events
from ignite.handlers import Checkpoint, EMAHandler
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointLoader, CheckpointSaver, StatsHandler, TensorBoardStatsHandler
from monai.inferers import DiffusionInferer, SimpleInferer
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel

from ..conditioning import AttributeEncoder
from ..networks.model import ConditionalLDM, atomic_torch_save
from ..networks.presets import autoencoder_config, build_autoencoder, build_scheduler, scheduler_config, unet_config
from .adapters import merge_adapters, prepare_finetune
from .losses import AutoencoderKLLoss
from .prepare_batch import AutoencoderPrepareBatch, LatentDriftPrepareBatch

__all__ = [
    "AUTOENCODER_FORMAT",
    "preprocess",
    "encode_latents",
    "scale_factor_from_latents",
    "train_autoencoder",
    "load_autoencoder",
    "train_diffusion",
    "finetune",
    "distributed_context",
]

AUTOENCODER_FORMAT = "monai_ld.autoencoder/1"
logger = logging.getLogger("monai_ld.train")


# -- data ------------------------------------------------------------------------------------------------------------
def preprocess(items: Sequence[Mapping[str, Any]], transform: Callable) -> list[dict[str, Any]]:
    """Run the preprocessing chain once over all items and keep plain tensors in memory (small phantom sets fit)."""
    out = []
    for item in items:
        d = transform(dict(item))
        sample = {"image": torch.as_tensor(d["image"]).float().contiguous()}
        if "condition" in d:
            sample["condition"] = torch.as_tensor(d["condition"]).float().reshape(1, -1)
        out.append(sample)
    return out


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


# -- distributed ------------------------------------------------------------------------------------------------------
@contextmanager
def distributed_context(device: str | torch.device):
    """Join the ``torchrun`` process group (``WORLD_SIZE > 1``); yields ``(rank, world_size)``.

    The group is created on first use and kept for the life of the process (destroyed at exit), so the autoencoder
    and diffusion stages of one run share it. Destroying and re-creating it is unsafe under ``torchrun``: torch resets
    its group counter on destroy, the new group reuses the old store keys in torchrun's long-lived store, and gloo then
    connects to the destroyed group's stale addresses ("Connection refused", a hang in the next barrier).

    Ignite's ``idist`` discovers a process group lazily on its first ``idist.get_rank()``-style call, and that discovery
    runs collectives (``new_group`` + ``all_reduce``). Here the first such call would come from handlers built only on
    rank 0 (``CheckpointSaver``): rank 0 would block in ``new_group`` while the others block in DDP's gradient
    all-reduce. So ignite is synced on every rank here. On a normal exit all ranks meet at a barrier, so rank 0's
    outputs (e.g. the autoencoder file the next stage reads) exist before any rank goes on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    idist.sync()  # collective: every rank, before any rank-0-only handler asks ignite for its rank
    yield dist.get_rank(), dist.get_world_size()
    dist.barrier()  # not on an exception: the other ranks may never get here (torchrun stops them all)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
        idist.sync()  # back to ignite's serial model


def _loader(samples: Sequence[Mapping[str, Any]], batch_size: int, seed: int, world: int, rank: int,
            transform: Callable | None = None) -> DataLoader:
    ds = Dataset(list(samples), transform=transform)
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=len(ds) >= batch_size * world)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=0, drop_last=len(ds) >= batch_size)


def _loss(output: Mapping[str, Any]) -> float:
    return float(output["loss"])


def _latest_checkpoint(ckpt_dir: Path) -> tuple[Path, frozenset[str]] | None:
    """The newest checkpoint that loads, with the names of the objects it holds. MONAI's ``CheckpointSaver`` writes
    non-atomically, so a run killed while saving leaves a truncated newest file: skip it and resume from the one
    before."""
    found = []
    for p in ckpt_dir.glob("checkpoint_*.pt"):
        m = re.search(r"=(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    for _, p in sorted(found, reverse=True):
        try:
            return p, frozenset(torch.load(p, map_location="cpu", weights_only=True))
        except Exception as e:  # truncated / corrupt
            logger.warning("skipping unreadable checkpoint %s (%s)", p, type(e).__name__)
    return None


def _run(
    network: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    loader: DataLoader,
    loss_function: Callable,
    prepare_batch: Callable,
    inferer: Any,
    max_iterations: int,
    lr: float,
    work_dir: Path,
    checkpoint_every: int,
    resume: bool,
    rank: int,
    device: torch.device,
    progress: bool,
    name: str,
    ema_decay: float | None = None,
) -> dict[str, Any]:
    """Train ``network`` for ``max_iterations`` with Adam; checkpoints in ``work_dir/checkpoints`` resume a killed run.

    ``ema_decay`` (e.g. 0.999): keep an exponential moving average of the weights (ignite's ``EMAHandler``, saved in
    the checkpoints) and leave it in ``network`` at the end; diffusion models sample better from averaged weights.
    """
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.999) or None, got {ema_decay}")
    optimizer = torch.optim.Adam(params, lr=lr)
    epoch_length = len(loader)
    if epoch_length == 0:
        raise ValueError("no training samples (the data loader is empty)")
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=math.ceil(max_iterations / epoch_length),
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss_function,
        prepare_batch=prepare_batch,
        inferer=inferer,
        epoch_length=epoch_length,
        decollate=False,
    )
    losses: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        losses.append(_loss(engine.state.output))
        if engine.state.iteration >= max_iterations:
            engine.terminate()

    ckpt_dir = work_dir / "checkpoints"
    base = network.module if isinstance(network, DistributedDataParallel) else network
    save_dict = {"network": base, "optimizer": optimizer, "trainer": trainer}
    ema = None
    if ema_decay is not None:
        ema = EMAHandler(base, momentum=1.0 - ema_decay)
        ema.attach(trainer, name="ema_momentum", warn_if_exists=False)
        save_dict["ema"] = ema.ema_model
    start_iteration, load_dict, ema_from_weights = 0, save_dict, False
    if resume and (found := _latest_checkpoint(ckpt_dir)) is not None:
        latest, held = found
        if ema is not None and "ema" not in held:  # a run started without EMA: average from the resumed weights on
            load_dict, ema_from_weights = {k: v for k, v in save_dict.items() if k != "ema"}, True
        CheckpointLoader(load_path=str(latest), load_dict=load_dict, map_location=device).attach(trainer)
        if ema_from_weights:  # after the loader's own STARTED handler
            trainer.add_event_handler(Events.STARTED, lambda _: ema.ema_model.load_state_dict(base.state_dict()))
        start_iteration = int(re.search(r"=(\d+)\.pt$", latest.name).group(1))  # type: ignore[union-attr]
        logger.info("%s: resuming from %s (iteration %d)", name, latest, start_iteration)
    if rank == 0:
        CheckpointSaver(save_dir=str(ckpt_dir), save_dict=save_dict, save_interval=checkpoint_every, epoch_level=False,
                        n_saved=2, file_prefix="checkpoint").attach(trainer)
        TensorBoardStatsHandler(log_dir=str(work_dir / "tensorboard"), output_transform=_loss,
                                tag_name=f"{name}_loss").attach(trainer)
        StatsHandler(name="monai_ld.train", output_transform=_loss, iteration_log=max(1, checkpoint_every)).attach(trainer)
        if progress:
            from ignite.handlers import ProgressBar

            ProgressBar(desc=name, persist=True).attach(trainer, output_transform=_loss)
    t0 = time.perf_counter()
    if start_iteration < max_iterations:
        trainer.run()
    elif start_iteration:  # nothing left to train: still take the checkpoint's weights
        Checkpoint.load_objects(to_load=load_dict, checkpoint=torch.load(latest, map_location=device, weights_only=True))
        trainer.state.iteration = start_iteration
        if ema_from_weights:
            ema.ema_model.load_state_dict(base.state_dict())
    seconds = time.perf_counter() - t0
    if ema is not None:
        base.load_state_dict(ema.ema_model.state_dict())
    tail = losses[-min(len(losses), 50):] if losses else []
    return {"iterations": int(trainer.state.iteration), "resumed_from": start_iteration, "seconds": round(seconds, 1),
            "final_loss": (sum(tail) / len(tail)) if tail else None, "ema_decay": ema_decay}


# -- autoencoder ------------------------------------------------------------------------------------------------------
def load_autoencoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Read an autoencoder written by :func:`train_autoencoder` (``weights_only=True``); returns ``(model, record)``."""
    ckpt = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != AUTOENCODER_FORMAT:
        raise ValueError(f"{path} is not a monai_ld autoencoder checkpoint (expected format {AUTOENCODER_FORMAT!r})")
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

    output = Path(output)
    work = Path(work_dir) if work_dir else output.with_suffix(".work")
    set_determinism(seed)
    cfg = dict(config) if config else autoencoder_config(spatial_dims, size)
    with distributed_context(device) as (rank, world):
        dev = torch.device(device)
        model = build_autoencoder(cfg).to(dev)
        net: torch.nn.Module = DistributedDataParallel(model) if world > 1 else model
        crop = RandSpatialCropd(keys="image", roi_size=tuple(patch_size), random_size=False) if patch_size else None
        if crop is not None:
            crop.set_random_state(seed + rank)
        loader = _loader(samples, batch_size, seed, world, rank, transform=crop)
        record = _run(net, list(model.parameters()), loader, AutoencoderKLLoss(kl_weight, "l1", perceptual_weight, spatial_dims),
                      AutoencoderPrepareBatch(), SimpleInferer(), max_iterations, lr, work, checkpoint_every, resume, rank,
                      dev, progress, "autoencoder")
        if rank == 0:
            record.update(samples=len(samples), batch_size=batch_size, lr=lr, kl_weight=kl_weight, seed=seed,
                          patch_size=list(patch_size) if patch_size else None, world_size=world)
            atomic_torch_save({"format": AUTOENCODER_FORMAT, "config": cfg, "state_dict": model.cpu().state_dict(),
                               "record": record}, output)
    return output


# -- latent diffusion -------------------------------------------------------------------------------------------------
def _latent_samples(autoencoder: torch.nn.Module, samples: Sequence[Mapping[str, Any]], device: str,
                    scale_factor: float | None) -> tuple[list[dict], float]:
    latents = encode_latents(autoencoder, samples, device=device)
    sf = scale_factor_from_latents(latents) if scale_factor is None else float(scale_factor)
    return [{"image": (z * sf), "condition": s["condition"]} for z, s in zip(latents, samples)], sf


def _diffusion_job(model: ConditionalLDM, params: Sequence[torch.nn.Parameter], samples: Sequence[Mapping[str, Any]],
                   output: Path, work: Path, max_iterations: int, batch_size: int, lr: float, condition_dropout: float,
                   drift: float, drift_target: str, checkpoint_every: int, resume: bool, seed: int, device: str,
                   progress: bool, name: str, scale_factor: float | None, before_save: Callable | None = None,
                   ema_decay: float | None = None) -> Path:
    if any("condition" not in s for s in samples):
        raise ValueError("every training sample needs a 'condition' (run preprocessing with the attribute encoder)")
    set_determinism(seed)
    with distributed_context(device) as (rank, world):
        dev = torch.device(device)
        latents, sf = _latent_samples(model.autoencoder, samples, device, scale_factor)
        model.scale_factor = sf
        unet = model.unet.to(dev).train()
        net: torch.nn.Module = DistributedDataParallel(unet) if world > 1 else unet
        scheduler = build_scheduler(model.scheduler_config)
        gen = torch.Generator().manual_seed(seed + rank)
        prepare = LatentDriftPrepareBatch(scheduler, drift=drift, drift_target=drift_target, condition_dropout=condition_dropout, generator=gen)
        record = _run(net, params, _loader(latents, batch_size, seed, world, rank), torch.nn.MSELoss(), prepare,
                      DiffusionInferer(scheduler), max_iterations, lr, work, checkpoint_every, resume, rank, dev, progress, name,
                      ema_decay)
        if rank == 0:
            if before_save is not None:
                before_save(model)
            record.update(samples=len(samples), batch_size=batch_size, lr=lr, condition_dropout=condition_dropout,
                          drift=drift, drift_target=drift_target, seed=seed, world_size=world, scale_factor=sf)
            model.meta = {**model.meta, f"{name}_record": record}
            model.drift_target = drift_target
            model.cpu().save(output)
    return output


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
    ae, _ = load_autoencoder(autoencoder)
    enc = attributes if isinstance(attributes, AttributeEncoder) else AttributeEncoder(attributes)
    ae_cfg = torch.load(Path(autoencoder), weights_only=True)["config"]
    ucfg = dict(unet) if unet else unet_config(int(ae_cfg["spatial_dims"]), int(ae_cfg.get("latent_channels", 3)), enc.dim, size)
    model = ConditionalLDM(ae_cfg, ucfg, enc, scheduler=scheduler or scheduler_config(), drift=drift,
                           drift_target=drift_target, meta=meta)
    model.autoencoder.load_state_dict(ae.state_dict())
    output = Path(output)
    return _diffusion_job(model, list(model.unet.parameters()), samples, output,
                          Path(work_dir) if work_dir else output.with_suffix(".work"), max_iterations, batch_size, lr,
                          condition_dropout, drift, drift_target, checkpoint_every, resume, seed, device, progress,
                          "diffusion", scale_factor, ema_decay=ema_decay)


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
    model = ConditionalLDM.load(base_model)
    params = prepare_finetune(model.unet, scheme, lora_rank)
    output = Path(output)
    model.drift = float(drift)
    model.meta = {**model.meta, "finetune": {"base": str(base_model), "scheme": scheme, "lora_rank": lora_rank if scheme == "lora" else None}}
    return _diffusion_job(model, params, samples, output, Path(work_dir) if work_dir else output.with_suffix(".work"),
                          max_iterations, batch_size, lr, condition_dropout, drift, drift_target, checkpoint_every, resume,
                          seed, device, progress, f"finetune_{scheme}", model.scale_factor,
                          before_save=lambda m: merge_adapters(m.unet), ema_decay=ema_decay)
