"""``LatentDriftInferer``: MONAI's ``LatentDiffusionInferer`` with Latent Drifting, inversion and counterfactuals.

The class holds what MONAI's inferer holds (scheduler, latent scale, latent resizers) plus the LD defaults, and
delegates the work to the plain functions of :mod:`monai_ld.sampling` (the edit's steps are described there). LD
training is not here: :class:`monai_ld.engines.LatentDriftPrepareBatch` feeds MONAI's ``DiffusionInferer`` the
drifted noise (:func:`monai_ld.drift.forward_drift`), so the inherited ``__call__`` is MONAI's plain forward pass.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import torch
from monai.data import decollate_batch
from monai.inferers import LatentDiffusionInferer

from .drift import Drift, drift_noise, with_drift
from .sampling import edit, loops, mask, steps
from .sampling.edit import Abduction, Composition, CounterfactualOutput
from .sampling.loops import InversionOutput
from .sampling.mask import mask_to_image
from .sampling.noise import Generators
from .sampling.steps import strength_timesteps
from .schedulers import ddim_inversion_step

__all__ = [
    "Abduction",
    "Composition",
    "CounterfactualOutput",
    "InversionOutput",
    "LatentDriftInferer",
    "ddim_inversion_step",
    "make_inferer",
    "mask_to_image",
    "strength_timesteps",
]


class LatentDriftInferer(LatentDiffusionInferer):
    """``LatentDiffusionInferer`` with Latent Drifting (LD), DDIM/flow inversion and counterfactual editing; 2D and 3D.

    Args:
        scheduler: a MONAI scheduler (DDIM or RFlow for inversion; DDPM/DDIM/PNDM/RFlow for sampling and noising).
        scale_factor: multiplies the autoencoder latents before the diffusion model (divided out before decoding).
        ldm_latent_shape, autoencoder_latent_shape: as in ``LatentDiffusionInferer``.
        drift: default δ for sampling and editing (``0`` = plain latent diffusion).
        num_inference_steps: sets the scheduler's timesteps (``None``: as the scheduler comes).
        drift_initial_noise: also start from noise drawn around δ (``z_T ~ N(δ, I)``, the start a model trained with
            forward drift and the ``shifted`` target has learned); off by default, so that drift is exactly
            "+δ after every step" as specified.

    Shapes: images ``(B, C, H, W[, D])``; latents ``(B, C_lat, h, w[, d])``; cross-attention conditions ``(B, 1, dim)``;
    ``mode="concat"`` conditions ``(B, C_cond, h, w[, d])``. ``generator``: a ``torch.Generator`` or one per batch item.
    """

    def __init__(self, scheduler: Any, scale_factor: float = 1.0, ldm_latent_shape: list | None = None,
                 autoencoder_latent_shape: list | None = None, drift: float = 0.0, drift_initial_noise: bool = False,
                 num_inference_steps: int | None = None) -> None:
        super().__init__(scheduler=scheduler, scale_factor=scale_factor, ldm_latent_shape=ldm_latent_shape,
                         autoencoder_latent_shape=autoencoder_latent_shape)
        self.drift = float(drift)
        self.drift_initial_noise = bool(drift_initial_noise)
        if num_inference_steps is not None:
            scheduler.set_timesteps(int(num_inference_steps))

    def with_steps(self, num_inference_steps: int) -> LatentDriftInferer:
        """This inferer over its own copy of the scheduler with ``num_inference_steps`` timesteps: a scheduler may
        keep state between steps (PNDM), and requests run concurrently."""
        inferer = copy.copy(self)
        inferer.scheduler = copy.deepcopy(self.scheduler)
        if getattr(inferer.scheduler, "num_inference_steps", None) != int(num_inference_steps):
            inferer.scheduler.set_timesteps(int(num_inference_steps))
        return inferer

    def _drift(self, drift: Drift | None) -> Drift:
        return self.drift if drift is None else drift

    predict = staticmethod(steps.predict)

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        autoencoder_model: Any,
        diffusion_model: Any,
        scheduler: Any | None = None,
        save_intermediates: bool | None = False,
        intermediate_steps: int | None = 100,
        conditioning: torch.Tensor | None = None,
        mode: str = "crossattn",
        verbose: bool = True,
        seg: torch.Tensor | None = None,
        cfg: float | None = None,
        cfg_fill_value: float = -1.0,
        drift: Drift | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The parent's sampling with ``z_{t-1} = step(...) + δ`` after every step (``drift=None``: the constructor's).

        With δ = 0 this *is* ``LatentDiffusionInferer.sample`` (same loop, same scheduler object), hence bit-identical
        for the same noise, networks and scheduler; the caller draws ``input_noise`` (with its generator).
        """
        delta = self._drift(drift)
        scheduler = scheduler or self.scheduler
        if self.drift_initial_noise:
            input_noise = drift_noise(input_noise, delta)
        return super().sample(input_noise=input_noise, autoencoder_model=autoencoder_model, diffusion_model=diffusion_model,
                              scheduler=with_drift(scheduler, delta), save_intermediates=save_intermediates,
                              intermediate_steps=intermediate_steps, conditioning=conditioning, mode=mode, verbose=verbose,
                              seg=seg, cfg=cfg, cfg_fill_value=cfg_fill_value)

    def encode(self, inputs: torch.Tensor, autoencoder_model: Any, sample_posterior: bool = False) -> torch.Tensor:
        """``z_0 = E(inputs) * scale_factor``; the posterior mean unless ``sample_posterior`` (then as MONAI's training)."""
        if sample_posterior or not hasattr(autoencoder_model, "encode") or not hasattr(autoencoder_model, "sampling"):
            z = autoencoder_model.encode_stage_2_inputs(inputs)
        else:
            z = autoencoder_model.encode(inputs)[0]
        z = z * self.scale_factor
        if self.ldm_latent_shape is not None:
            z = torch.stack([self.ldm_resizer(i) for i in decollate_batch(z)], 0)
        return z

    def decode(self, latents: torch.Tensor, autoencoder_model: Any) -> torch.Tensor:
        """``D(latents / scale_factor)`` (the scale is divided out BEFORE decoding)."""
        if self.autoencoder_latent_shape is not None:
            latents = torch.stack([self.autoencoder_resizer(i) for i in decollate_batch(latents)], 0)
        return autoencoder_model.decode_stage_2_outputs(latents / self.scale_factor)

    @torch.no_grad()
    def invert(self, diffusion_model: Any, inputs: torch.Tensor | None = None, autoencoder_model: Any | None = None,
               latents: torch.Tensor | None = None, conditioning: torch.Tensor | None = None, strength: float = 1.0,
               mode: str = "crossattn", scheduler: Any | None = None, drift: Drift = 0.0, cfg: float | None = None,
               cfg_fill_value: float = -1.0, verbose: bool = False) -> InversionOutput:
        """Inversion (:func:`monai_ld.sampling.invert`) of ``latents``, or of ``inputs`` encoded by ``autoencoder_model``."""
        if latents is None:
            if inputs is None or autoencoder_model is None:
                raise ValueError("invert needs either latents, or inputs together with autoencoder_model")
            latents = self.encode(inputs, autoencoder_model)
        return loops.invert(diffusion_model, latents, scheduler or self.scheduler, conditioning, strength, mode, drift,
                            cfg, cfg_fill_value, verbose)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, diffusion_model: Any, timesteps: torch.Tensor,
                conditioning: torch.Tensor | None = None, mode: str = "crossattn", scheduler: Any | None = None,
                cfg: float | None = None, cfg_fill_value: float = -1.0, drift: Drift | None = None,
                uncondition: torch.Tensor | None = None, verbose: bool = False,
                blend: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
                trajectory: list[torch.Tensor] | None = None, generator: Generators | None = None) -> torch.Tensor:
        """The reverse process with δ after every step (:func:`monai_ld.sampling.denoise`; ``drift=None``: the
        constructor's)."""
        return loops.denoise(diffusion_model, latents, timesteps, scheduler or self.scheduler, conditioning, mode, cfg,
                             cfg_fill_value, self._drift(drift), uncondition, generator, blend, trajectory, verbose)

    @torch.no_grad()
    def edit_mask(self, diffusion_model: Any, latents: torch.Tensor, source_condition: torch.Tensor,
                  target_condition: torch.Tensor, timestep: Any, threshold: float = 0.5, samples: int = 4,
                  mode: str = "crossattn", scheduler: Any | None = None,
                  generator: Generators | None = None) -> torch.Tensor:
        """DiffEdit's mask ``(B, 1, *latent)`` (:func:`monai_ld.sampling.edit_mask`)."""
        return mask.edit_mask(diffusion_model, latents, scheduler or self.scheduler, source_condition, target_condition,
                              timestep, threshold, samples, mode, generator)

    @torch.no_grad()
    def counterfactual(
        self,
        inputs: torch.Tensor,
        autoencoder_model: Any,
        diffusion_model: Any,
        source_condition: torch.Tensor | None,
        target_condition: torch.Tensor,
        drift: Drift | None = None,
        scheduler: Any | None = None,
        **options: Any,
    ) -> CounterfactualOutput:
        """What ``inputs`` ``(B, C, H, W[, D])`` would look like under ``target_condition``: abduction -> action ->
        prediction with this inferer's latent scale, scheduler and δ (``drift=None``: the constructor's).
        ``options`` are :func:`monai_ld.sampling.counterfactual`'s (``strength``, ``guidance_scale``, ``abduction``,
        ``composition``, ``generator``, ``mask_threshold``, ...), stated once there.

        Returns:
            :class:`CounterfactualOutput` with ``image`` of the same shape and dtype as ``inputs``.
        """
        return edit.counterfactual(
            inputs, partial(self.encode, autoencoder_model=autoencoder_model),
            partial(self.decode, autoencoder_model=autoencoder_model), diffusion_model, scheduler or self.scheduler,
            source_condition, target_condition, drift=self._drift(drift),
            **{"drift_initial_noise": self.drift_initial_noise, **options},
        )


def make_inferer(model: Any, num_inference_steps: int | None = None, drift: float | None = None) -> LatentDriftInferer:
    """A :class:`LatentDriftInferer` with a :class:`~monai_ld.networks.ConditionalLDM`'s scheduler (``num_inference_steps``
    set), scale factor and LD defaults (``drift`` overrides the model's δ)."""
    return LatentDriftInferer(
        scheduler=model.make_scheduler(num_inference_steps),
        scale_factor=model.scale_factor,
        drift=model.drift if drift is None else float(drift),
        drift_initial_noise=model.drift_initial_noise,
    )
