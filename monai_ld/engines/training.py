"""Training jobs on MONAI's ``SupervisedTrainer``: autoencoder, latent diffusion (with LD), fine-tuning.

Each job takes preprocessed samples (dicts with ``"image"`` ``(1, *spatial)`` and ``"condition"`` ``(1, dim)``; see
:func:`preprocess`), trains with MONAI/ignite handlers (progress bar, TensorBoard, iteration checkpoints that a
re-run resumes from), and writes its result atomically. Under ``torchrun`` (``WORLD_SIZE > 1``) each job trains
with DistributedDataParallel (gloo on CPU, NCCL on GPU), and rank 0 writes.

The jobs live in :mod:`.autoencoder` and :mod:`.diffusion`, their shared run and DDP plumbing in :mod:`.runs`; this
module is the one import path for all of them (bundle configs, the campaign and benchmarks use it).
"""

from .autoencoder import AUTOENCODER_FORMAT, load_autoencoder, train_autoencoder
from .diffusion import encode_latents, finetune, scale_factor_from_latents, train_diffusion
from .runs import distributed_context, preprocess

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
