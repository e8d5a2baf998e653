"""What every training job shares: the samples it feeds, the ``torchrun`` process group, and one resumable run of
MONAI's ``SupervisedTrainer`` (Adam, optional EMA, iteration checkpoints, progress bar, TensorBoard).

A job describes its run with :class:`TrainingRun` (length, batch, step size, seed, where it writes) and its iteration
with :class:`TrainingStep` (loss, prepare-batch, inferer); :func:`fit` trains with both.
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
from dataclasses import dataclass
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
from torch.nn.parallel import DistributedDataParallel

__all__ = ["TrainingRun", "TrainingStep", "preprocess", "distributed_context", "sample_loader", "fit"]

logger = logging.getLogger("monai_ld.train")


@dataclass(frozen=True)
class TrainingRun:
    """One job's run: ``name`` tags its logs and record, ``output`` is the file it writes, ``work_dir`` holds its
    checkpoints (a re-run resumes from them when ``resume``) and TensorBoard logs. ``ema_decay`` (e.g. 0.999) keeps an
    exponential moving average of the weights and leaves it in the network at the end (diffusion models sample better
    from averaged weights)."""

    name: str
    output: Path
    work_dir: Path
    max_iterations: int
    batch_size: int
    lr: float
    checkpoint_every: int
    resume: bool
    seed: int
    device: str
    progress: bool
    ema_decay: float | None = None

    def __post_init__(self):
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.999) or None, got {self.ema_decay}")

    @classmethod
    def at(cls, output: str | os.PathLike, work_dir: str | os.PathLike | None = None, **settings: Any) -> TrainingRun:
        """A run writing ``output``, with its work files in ``work_dir`` (default: ``<output>.work``)."""
        output = Path(output)
        return cls(output=output, work_dir=Path(work_dir) if work_dir else output.with_suffix(".work"), **settings)


@dataclass(frozen=True)
class TrainingStep:
    """What one iteration computes: ``inferer(prepare_batch(batch))`` against ``loss_function``."""

    loss_function: Callable
    prepare_batch: Callable
    inferer: Any


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


def sample_loader(samples: Sequence[Mapping[str, Any]], run: TrainingRun, world: int, rank: int,
                  transform: Callable | None = None) -> DataLoader:
    """Shuffled batches seeded by ``run.seed``; under DDP each rank gets its shard."""
    ds = Dataset(list(samples), transform=transform)
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=run.seed)
        return DataLoader(ds, batch_size=run.batch_size, sampler=sampler, num_workers=0,
                          drop_last=len(ds) >= run.batch_size * world)
    g = torch.Generator().manual_seed(run.seed)
    return DataLoader(ds, batch_size=run.batch_size, shuffle=True, generator=g, num_workers=0,
                      drop_last=len(ds) >= run.batch_size)


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


# -- the run ----------------------------------------------------------------------------------------------------------
def _loss(output: Mapping[str, Any]) -> float:
    return float(output["loss"])


def _latest_checkpoint(ckpt_dir: Path, name: str) -> tuple[Path, frozenset[str]] | None:
    """The newest checkpoint of the job ``name`` that loads, with the names of the objects it holds (files are
    prefixed with the job's name, so jobs sharing a work dir never resume from each other's networks). MONAI's
    ``CheckpointSaver`` writes non-atomically, so a run killed while saving leaves a truncated newest file: skip it and
    resume from the one before."""
    found = []
    for p in ckpt_dir.glob(f"{name}_checkpoint_*.pt"):
        m = re.search(r"=(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    for _, p in sorted(found, reverse=True):
        try:
            return p, frozenset(torch.load(p, map_location="cpu", weights_only=True))
        except Exception as e:  # truncated / corrupt
            logger.warning("skipping unreadable checkpoint %s (%s)", p, type(e).__name__)
    return None


def fit(run: TrainingRun, network: torch.nn.Module, params: Sequence[torch.nn.Parameter], loader: DataLoader,
        step: TrainingStep, rank: int) -> dict[str, Any]:
    """Train ``network`` (DDP-wrapped or not) for ``run.max_iterations`` with Adam on ``params``; checkpoints in
    ``run.work_dir/checkpoints`` resume a killed run. Returns the run's record (iterations, time, final loss)."""
    device = torch.device(run.device)
    optimizer = torch.optim.Adam(params, lr=run.lr)
    epoch_length = len(loader)
    if epoch_length == 0:
        raise ValueError("no training samples (the data loader is empty)")
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=math.ceil(run.max_iterations / epoch_length),
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=step.loss_function,
        prepare_batch=step.prepare_batch,
        inferer=step.inferer,
        epoch_length=epoch_length,
        decollate=False,
    )
    losses: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        losses.append(_loss(engine.state.output))
        if engine.state.iteration >= run.max_iterations:
            engine.terminate()

    ckpt_dir = run.work_dir / "checkpoints"
    base = network.module if isinstance(network, DistributedDataParallel) else network
    save_dict = {"network": base, "optimizer": optimizer, "trainer": trainer}
    ema = None
    if run.ema_decay is not None:
        ema = EMAHandler(base, momentum=1.0 - run.ema_decay)
        ema.attach(trainer, name="ema_momentum", warn_if_exists=False)
        save_dict["ema"] = ema.ema_model
    start_iteration, load_dict, ema_from_weights = 0, save_dict, False
    if run.resume and (found := _latest_checkpoint(ckpt_dir, run.name)) is not None:
        latest, held = found
        if ema is not None and "ema" not in held:  # a run started without EMA: average from the resumed weights on
            load_dict, ema_from_weights = {k: v for k, v in save_dict.items() if k != "ema"}, True
        CheckpointLoader(load_path=str(latest), load_dict=load_dict, map_location=device).attach(trainer)
        if ema_from_weights:  # after the loader's own STARTED handler
            trainer.add_event_handler(Events.STARTED, lambda _: ema.ema_model.load_state_dict(base.state_dict()))
        start_iteration = int(re.search(r"=(\d+)\.pt$", latest.name).group(1))  # type: ignore[union-attr]
        logger.info("%s: resuming from %s (iteration %d)", run.name, latest, start_iteration)
    if rank == 0:
        CheckpointSaver(save_dir=str(ckpt_dir), save_dict=save_dict, save_interval=run.checkpoint_every,
                        epoch_level=False, n_saved=2, file_prefix=run.name).attach(trainer)
        TensorBoardStatsHandler(log_dir=str(run.work_dir / "tensorboard"), output_transform=_loss,
                                tag_name=f"{run.name}_loss").attach(trainer)
        StatsHandler(name="monai_ld.train", output_transform=_loss,
                     iteration_log=max(1, run.checkpoint_every)).attach(trainer)
        if run.progress:
            from ignite.handlers import ProgressBar

            ProgressBar(desc=run.name, persist=True).attach(trainer, output_transform=_loss)
    t0 = time.perf_counter()
    if start_iteration < run.max_iterations:
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
            "final_loss": (sum(tail) / len(tail)) if tail else None, "ema_decay": run.ema_decay}
