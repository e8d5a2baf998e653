"""Network presets and the one-file model checkpoint."""

from .model import CHECKPOINT_FORMAT, ConditionalLDM, atomic_torch_save
from .presets import (
    SIZES,
    autoencoder_config,
    build_autoencoder,
    build_scheduler,
    build_unet,
    scheduler_config,
    unet_config,
)
