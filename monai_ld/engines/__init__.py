"""Training engines: autoencoder, latent diffusion with Latent Drifting, fine-tuning schemes."""

from .adapters import FINETUNE_SCHEMES, inject_context_adapter, inject_lora, merge_adapters, prepare_finetune
from .losses import AutoencoderKLLoss
from .prepare_batch import AutoencoderPrepareBatch, LatentDriftPrepareBatch
from .training import (
    encode_latents,
    finetune,
    load_autoencoder,
    preprocess,
    scale_factor_from_latents,
    train_autoencoder,
    train_diffusion,
)
