"""The counterfactual edit, abduction -> action -> prediction:

1. encode the image, ``z_0 = E(x) * scale_factor``;
2. abduction: DDIM-invert ``z_0`` under the SOURCE condition up to ``strength`` (or, ``abduction="noising"``,
   noise it stochastically to that level);
3. action: swap in the TARGET condition;
4. prediction: denoise back to ``t=0`` under the target with classifier-free guidance and drift δ, decode;
5. optionally keep the input's detail: ``x + (D(z'_0) - D(z_0))`` (``composition="residual"``), or
   ``x + (D(z'_0) - D(z^s_0))`` where ``z^s_0`` re-generates the same ``z_t`` under the SOURCE condition with the
   same guidance, drift and noise (``composition="paired"``): only the change of condition reaches the image, so
   an identity intervention returns ``x`` exactly, at twice the denoising cost.

Optionally (``mask_threshold``) the edit is localised as in DiffEdit: a latent mask (:func:`.mask.edit_mask`) keeps
every denoising step outside it on the source trajectory, and the decoded change is kept inside the mask's
image-space region (:func:`.mask.mask_to_image`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..drift import Drift
from ..settings import Abduction, Composition
from .loops import denoise, invert, noise_latents
from .mask import edit_mask, mask_to_image
from .noise import Generators, derive_generator, generator_state, restore_generator_state
from .steps import strength_timesteps

__all__ = ["Abduction", "Composition", "CounterfactualOutput", "counterfactual"]


@dataclass
class CounterfactualOutput:
    """Result of :func:`counterfactual`; images have the input's shape and dtype.

    Attributes:
        image: the counterfactual ``(B, C, *spatial)``.
        reconstruction: ``D(z_0)``, the autoencoder's reconstruction of the input (the edit's baseline).
        difference: ``image - inputs``, the difference map.
        change: what the generator changed, ``D(z'_0) - D(z_0)`` (``D(z'_0) - D(z^s_0)`` for ``"paired"``); equals
            ``difference`` for the residual compositions, while for ``"none"`` the difference also holds the
            autoencoder's reconstruction error.
        latents: ``{"source": z_0, "inverted": z_t, "counterfactual": z'_0}`` (and ``"mask"``, ``(B, 1, *latent)``,
            when the edit was localised).
        settings: what was done (strength, steps, guidance, drift, abduction, composition, mask_threshold).
    """

    image: torch.Tensor
    reconstruction: torch.Tensor
    difference: torch.Tensor
    change: torch.Tensor | None = None
    latents: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def _as_number(drift: Drift) -> Any:
    return drift.tolist() if isinstance(drift, torch.Tensor) else float(drift)


def _check(inputs: torch.Tensor, source: torch.Tensor | None, target: torch.Tensor, fill: float) -> torch.Tensor:
    """The source condition (``None`` -> the null condition) after checking the shapes."""
    if inputs.ndim not in (4, 5):
        raise ValueError(f"inputs must be (B, C, H, W) or (B, C, H, W, D), got shape {tuple(inputs.shape)}")
    if target is None:
        raise ValueError("target_condition is required (the counterfactual's attributes)")
    if target.shape[0] != inputs.shape[0]:
        raise ValueError(f"target_condition batch {target.shape[0]} != inputs batch {inputs.shape[0]}")
    if source is None:
        return torch.full_like(target, fill)
    if source.shape != target.shape:
        raise ValueError(f"source_condition {tuple(source.shape)} and target_condition {tuple(target.shape)} differ in shape")
    return source


@torch.no_grad()
def counterfactual(
    inputs: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    diffusion_model: Any,
    scheduler: Any,
    source_condition: torch.Tensor | None,
    target_condition: torch.Tensor,
    strength: float = 0.5,
    guidance_scale: float | None = 3.0,
    drift: Drift = 0.0,
    inversion_drift: Drift = 0.0,
    mode: str = "crossattn",
    abduction: Abduction | str = Abduction.INVERSION,
    composition: Composition | str = Composition.NONE,
    cfg_fill_value: float = -1.0,
    generator: Generators | None = None,
    drift_initial_noise: bool = False,
    mask_threshold: float | None = None,
    mask_samples: int = 4,
    verbose: bool = False,
) -> CounterfactualOutput:
    """What ``inputs`` would look like under ``target_condition`` (abduction -> action -> prediction).

    Args:
        inputs: images ``(B, C, H, W[, D])`` with a spatial size the autoencoder accepts.
        encode, decode: image ``->`` scaled latent ``z_0`` and back (e.g. ``LatentDriftInferer.encode`` / ``decode``).
        scheduler: DDIM or RFlow for ``"inversion"``; any MONAI scheduler for ``"noising"``.
        source_condition: the inputs' own condition, or ``None`` to abduct under the null (unconditional)
            condition (a tensor like ``target_condition`` filled with ``cfg_fill_value``).
        target_condition: the intervened condition (cross-attention ``(B, 1, dim)`` or concat channels).
        strength: fraction of the inference steps inverted and re-generated (0 = reconstruction only).
        guidance_scale: classifier-free guidance ``w`` while generating under the target (None = no CFG).
        drift: LD δ while generating; ``inversion_drift``: δ added during inversion (see :func:`.loops.invert`).
        abduction: ``"inversion"`` (deterministic) or ``"noising"`` (stochastic; the noise drawn around δ when
            ``drift_initial_noise``).
        composition: ``"none"``, ``"residual"`` (``x + D(z'_0) - D(z_0)``) or ``"paired"``
            (``x + D(z'_0) - D(z^s_0)``, ``z^s_0`` denoised from the same ``z_t`` under the source condition).
        generator: every draw (noising, the mask's noise, a stochastic step's noise), in that order; a list gives
            each batch item its own. ``None``: one generator derived from torch's default generator.
        mask_threshold: localise the edit (DiffEdit): steps outside the mask follow the source trajectory ``z^s``.
            None (default): no mask. ``mask_samples``: noise draws for the mask.

    Returns:
        :class:`CounterfactualOutput` with ``image`` of the same shape and dtype as ``inputs``.
    """
    abduction, composition = Abduction(abduction), Composition(composition)
    source_condition = _check(inputs, source_condition, target_condition, cfg_fill_value)
    work = inputs.float()
    z0 = encode(work)
    reconstruction = decode(z0)
    factor = 2 ** (len(getattr(diffusion_model, "block_out_channels", [0])) - 1)
    if reconstruction.shape != inputs.shape or any(s % factor for s in z0.shape[2:]):
        raise ValueError(
            f"input spatial shape {tuple(inputs.shape[2:])} does not fit the networks (autoencoder output "
            f"{tuple(reconstruction.shape[2:])}, latent {tuple(z0.shape[2:])}, UNet needs latent sizes a multiple of "
            f"{factor}); pad/crop inputs to a multiple of the total downsampling"
        )
    generator = derive_generator(z0.device) if generator is None else generator
    if abduction == Abduction.INVERSION:
        inv = invert(diffusion_model, z0, scheduler, source_condition, strength, mode, inversion_drift,
                     cfg_fill_value=cfg_fill_value, verbose=verbose)
        zt, timesteps = inv.latent, inv.timesteps
    else:
        timesteps = strength_timesteps(scheduler, strength)
        zt = noise_latents(scheduler, z0, timesteps, generator, drift if drift_initial_noise else None)

    mask = None
    if mask_threshold is not None and len(timesteps):
        mask = edit_mask(diffusion_model, z0, scheduler, source_condition, target_condition, timesteps[0],
                         mask_threshold, mask_samples, mode, generator)
    run = dict(diffusion_model=diffusion_model, latents=zt, timesteps=timesteps, scheduler=scheduler, mode=mode,
               cfg=guidance_scale, cfg_fill_value=cfg_fill_value, drift=drift, generator=generator, verbose=verbose)
    baseline, source_path = reconstruction, None
    if composition == Composition.PAIRED or mask is not None:
        # the same z_t, guidance, drift and step noise under the source condition: what the generator alone makes
        # (the paired baseline) and the trajectory a masked edit keeps outside its mask; the generator is rewound
        # after it, so the target run draws the very same step noise
        state = generator_state(generator)
        source_path = [] if mask is not None else None
        z_src = denoise(conditioning=source_condition, trajectory=source_path, **run)
        if composition == Composition.PAIRED:
            baseline = decode(z_src)
        restore_generator_state(generator, state)
    z_cf = denoise(conditioning=target_condition, blend=None if mask is None else (mask, source_path), **run)
    decoded = decode(z_cf)
    change = decoded - baseline
    if mask is not None:
        # the decoder's GroupNorm spreads even a local latent change over the whole image: keep it in the region
        change = change * mask_to_image(mask, change.shape[2:])
    if composition == Composition.NONE:
        image = decoded if mask is None else baseline + change
    else:
        image = work + change
    image = image.to(inputs.dtype)
    return CounterfactualOutput(
        image=image,
        reconstruction=reconstruction.to(inputs.dtype),
        difference=(image.float() - work).to(inputs.dtype),
        change=change.to(inputs.dtype),
        latents={"source": z0, "inverted": zt, "counterfactual": z_cf, **({"mask": mask} if mask is not None else {})},
        settings={
            "strength": float(strength),
            "steps": int(len(timesteps)),
            "num_inference_steps": int(len(scheduler.timesteps)),
            "guidance_scale": None if guidance_scale is None else float(guidance_scale),
            "drift": _as_number(drift),
            "inversion_drift": _as_number(inversion_drift),
            "abduction": str(abduction),
            "composition": str(composition),
            "source": "null" if bool((source_condition == cfg_fill_value).all()) else "given",
            "mask_threshold": None if mask_threshold is None else float(mask_threshold),
        },
    )
