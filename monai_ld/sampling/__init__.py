"""Sampling as small parts: plain functions of the networks, a MONAI scheduler and explicit ``torch.Generator`` s.

- :mod:`.noise`: noise drawing (one generator, or one per batch item), rewinding a generator;
- :mod:`.steps`: one guided denoiser evaluation, one reverse step, strength timesteps;
- :mod:`.loops`: inversion, the reverse process with Latent Drifting, stochastic noising;
- :mod:`.mask`: the DiffEdit mask;
- :mod:`.edit`: the counterfactual (abduction -> action -> prediction, paired composition, localised edits).

:class:`monai_ld.inferers.LatentDriftInferer` is MONAI's ``LatentDiffusionInferer`` delegating to these.
"""

from .edit import Abduction, Composition, CounterfactualOutput, counterfactual
from .loops import InversionOutput, denoise, invert, noise_latents
from .mask import edit_mask, mask_to_image
from .noise import Generators, derive_generator, generator_state, randn, restore_generator_state
from .steps import predict, scheduler_step, strength_timesteps

__all__ = [
    "Abduction",
    "Composition",
    "CounterfactualOutput",
    "Generators",
    "InversionOutput",
    "counterfactual",
    "denoise",
    "derive_generator",
    "edit_mask",
    "generator_state",
    "invert",
    "mask_to_image",
    "noise_latents",
    "predict",
    "randn",
    "restore_generator_state",
    "scheduler_step",
    "strength_timesteps",
]
