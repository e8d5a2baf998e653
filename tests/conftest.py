import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny convolutions run faster on one thread


def randomise_output(unet: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """MONAI zero-initialises the UNet's output conv (an untrained UNet predicts exactly 0); give it weights so
    tests exercise a model whose prediction depends on its input, timestep and condition."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return unet


@pytest.fixture
def tiny_models():
    """Factory: (autoencoder, unet, encoder) for spatial_dims 2 or 3, tiny, deterministic, eval mode."""
    from monai_ld import AttributeEncoder, CategoricalAttribute, ContinuousAttribute
    from monai_ld.networks import autoencoder_config, build_autoencoder, build_unet, unet_config

    def make(spatial_dims: int = 2, seed: int = 0):
        enc = AttributeEncoder([ContinuousAttribute("age", 40, 95, "years"), CategoricalAttribute("sex", ("F", "M"))])
        torch.manual_seed(seed)
        ae = build_autoencoder(autoencoder_config(spatial_dims, "tiny")).eval()
        unet = randomise_output(build_unet(unet_config(spatial_dims, 3, enc.dim, "tiny")), seed).eval()
        return ae, unet, enc

    return make
