"""``LatentDriftInferer``: MONAI's ``LatentDiffusionInferer`` with Latent Drifting, inversion and counterfactuals.

A counterfactual follows abduction -> action -> prediction:

1. encode the image, ``z_0 = E(x) * scale_factor``;
2. abduction: DDIM-invert ``z_0`` under the SOURCE condition up to ``strength`` (or, ``abduction="noising"``,
   noise it stochastically to that level);
3. action: swap in the TARGET condition;
4. prediction: denoise back to ``t=0`` under the target with classifier-free guidance and drift δ, decode.
5. optionally keep the input's detail: ``x + (D(z'_0) - D(z_0))`` (``composition="residual"``), or
   ``x + (D(z'_0) - D(z^s_0))`` where ``z^s_0`` re-generates the same ``z_t`` under the SOURCE condition with the
   same guidance, drift and noise (``composition="paired"``): only the change of condition reaches the image, so
   an identity intervention returns ``x`` exactly, at twice the denoising cost.

Optionally (``mask_threshold``) the edit is localised as in DiffEdit (Couairon et al., 2022): a latent mask where the
noise predictions under the target and the source conditions differ most (averaged over a few noise draws) keeps
every denoising step outside it on the source trajectory, and the decoded change is kept inside the mask's image-space
region (:func:`mask_to_image`), so only the region the condition acts on changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from monai.data import decollate_batch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler
from monai.utils import StrEnum

from .drift import Drift, DriftTarget, apply_step_drift, drift_noise, forward_drift, with_drift
from .schedulers.rflow import is_rflow, next_timesteps, rflow_inversion_step

__all__ = [
    "Abduction",
    "Composition",
    "CounterfactualOutput",
    "InversionOutput",
    "LatentDriftInferer",
    "ddim_inversion_step",
    "mask_to_image",
    "strength_timesteps",
]


class Abduction(StrEnum):
    """How the source image's noise is recovered."""

    INVERSION = "inversion"  # deterministic DDIM inversion under the source condition
    NOISING = "noising"  # stochastic forward noising (SDEdit-like)


class Composition(StrEnum):
    """How the edited decode is put back together with the input."""

    NONE = "none"  # the decoded counterfactual D(z'_0)
    RESIDUAL = "residual"  # x + (D(z'_0) - D(z_0)): keep what the autoencoder cannot reconstruct
    PAIRED = "paired"  # x + (D(z'_0) - D(z^s_0)): z^s_0 regenerated from the same z_t under the source condition


@dataclass
class InversionOutput:
    """Result of :meth:`LatentDriftInferer.invert`.

    Attributes:
        latent: the noised latent ``z_t`` at the last inverted level, ``(B, C_lat, *latent_spatial)``.
        timesteps: the descending timesteps that denoise ``latent`` back to ``t=0`` (empty when strength is 0).
        clean_latent: ``z_0`` the inversion started from.
    """

    latent: torch.Tensor
    timesteps: torch.Tensor
    clean_latent: torch.Tensor


@dataclass
class CounterfactualOutput:
    """Result of :meth:`LatentDriftInferer.counterfactual`; images have the input's shape and dtype.

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


def _rng_state(device: torch.device, state: tuple | None = None) -> tuple:
    """Get (``state=None``) or restore the global RNG state of the CPU and, for a CUDA ``device``, that device."""
    cuda = torch.device(device).type == "cuda"
    if state is None:
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None
    torch.set_rng_state(state[0])
    if cuda:
        torch.cuda.set_rng_state(state[1], device)
    return state


def _randn(shape: Any, generator: torch.Generator | list[torch.Generator] | None, dtype: torch.dtype,
           device: Any) -> torch.Tensor:
    """Standard normal noise of ``shape``; a list of generators (one per batch item) makes item ``i`` draw what a
    batch of one with ``generator[i]`` draws (N samples from seeds s, s+1, ... run as one batch)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([_randn((1, *shape[1:]), g, dtype, device) for g in generator])
    return torch.randn(shape, generator=generator, dtype=dtype,
                       device="cpu" if generator is None else generator.device).to(device)


def mask_to_image(mask: torch.Tensor, spatial_size: Any) -> torch.Tensor:
    """A latent edit mask ``(B, 1, *latent)`` as an image-space weight ``(B, 1, *spatial_size)`` in ``[0, 1]``: dilated
    by one latent voxel (the decoder's local reach), then linearly upsampled (a soft edge one latent voxel wide)."""
    nd = mask.ndim - 2
    pool = torch.nn.functional.max_pool2d if nd == 2 else torch.nn.functional.max_pool3d
    grown = pool(mask.float(), kernel_size=3, stride=1, padding=1)
    return torch.nn.functional.interpolate(grown, size=tuple(spatial_size), mode="bilinear" if nd == 2 else "trilinear",
                                           align_corners=False).to(mask.dtype)


def strength_timesteps(scheduler: Any, strength: float) -> torch.Tensor:
    """The last ``round(strength * N)`` of the scheduler's ``N`` descending inference timesteps.

    ``strength=1`` inverts to pure noise, ``0`` does nothing.
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    timesteps = scheduler.timesteps
    n = len(timesteps)
    k = int(round(float(strength) * n))
    return timesteps[n - k :]


def _alpha_bar(scheduler: Any, timestep: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[timestep] if timestep >= 0 else scheduler.final_alpha_cumprod


def _to_x0_eps(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor):
    if prediction_type == "epsilon":
        return (sample - (1 - alpha) ** 0.5 * model_output) / alpha**0.5, model_output
    if prediction_type == "v_prediction":
        return alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output, alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
    if prediction_type == "sample":
        return model_output, (sample - alpha**0.5 * model_output) / (1 - alpha) ** 0.5
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def ddim_inversion_step(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
    """Exact mirror of ``DDIMScheduler.step(·, timestep, ·)`` (η=0): from the level ``step`` lands on back to ``timestep``.

    MONAI's ``reversed_step(t)`` maps level ``t`` to ``t + T//N``, one step off the level ``step(t + T//N)`` lands
    on when the linspace timesteps are not multiples of ``T//N``, and reads ``alphas_cumprod[-T//N]`` at t=0; this
    uses the very alphas ``step`` used, so inverting then denoising closes up to the model's ε drift between levels.
    """
    t = int(timestep)
    prev_t = t - scheduler.num_train_timesteps // scheduler.num_inference_steps
    a_from, a_to = _alpha_bar(scheduler, prev_t), _alpha_bar(scheduler, t)
    x0, eps = _to_x0_eps(str(scheduler.prediction_type), model_output, sample, a_from)
    if scheduler.clip_sample:
        x0 = torch.clamp(x0, scheduler.clip_sample_values[0], scheduler.clip_sample_values[1])
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


class LatentDriftInferer(LatentDiffusionInferer):
    """``LatentDiffusionInferer`` with Latent Drifting (LD), DDIM inversion and counterfactual editing; 2D and 3D.

    Args:
        scheduler: a MONAI scheduler (DDIM for inversion/counterfactuals; DDPM/DDIM/PNDM for sampling).
        scale_factor: multiplies the autoencoder latents before the diffusion model (divided out before decoding).
        ldm_latent_shape, autoencoder_latent_shape: as in ``LatentDiffusionInferer``.
        drift: default δ for sampling and training (``0`` = plain latent diffusion).
        drift_target: regression target under forward drift, see :class:`monai_ld.drift.DriftTarget`.
        drift_initial_noise: also start sampling from ``z_T ~ N(δ, I)`` instead of ``N(0, I)`` (the start that a
            model trained with forward drift and the ``shifted`` target has learned); off by default, so that
            drift is exactly "+δ after every step" as specified.

    Shapes: images ``(B, C, H, W[, D])``; latents ``(B, C_lat, h, w[, d])``; cross-attention conditions ``(B, 1, dim)``;
    ``mode="concat"`` conditions ``(B, C_cond, h, w[, d])``.
    """

    def __init__(
        self,
        scheduler: Any,
        scale_factor: float = 1.0,
        ldm_latent_shape: list | None = None,
        autoencoder_latent_shape: list | None = None,
        drift: float = 0.0,
        drift_target: DriftTarget | str = DriftTarget.SHIFTED,
        drift_initial_noise: bool = False,
    ) -> None:
        super().__init__(
            scheduler=scheduler,
            scale_factor=scale_factor,
            ldm_latent_shape=ldm_latent_shape,
            autoencoder_latent_shape=autoencoder_latent_shape,
        )
        self.drift = float(drift)
        self.drift_target = DriftTarget(drift_target)
        self.drift_initial_noise = bool(drift_initial_noise)

    def _drift(self, drift: Drift | None) -> Drift:
        return self.drift if drift is None else drift

    # -- training -------------------------------------------------------------------------------------------------
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        autoencoder_model: Any,
        diffusion_model: Any,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
        drift: Drift | None = None,
    ) -> torch.Tensor:
        """Training forward pass: the prediction for ``add_noise(E(inputs)·s, noise + δ, timesteps)``.

        ``noise`` is standard normal; the drift is added here. The matching regression target is
        :meth:`training_target` with the same ``noise`` and ``drift``.
        """
        return super().__call__(
            inputs=inputs,
            autoencoder_model=autoencoder_model,
            diffusion_model=diffusion_model,
            noise=drift_noise(noise, self._drift(drift)),
            timesteps=timesteps,
            condition=condition,
            mode=mode,
            seg=seg,
        )

    def training_target(
        self,
        noise: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        drift: Drift | None = None,
    ) -> torch.Tensor:
        """The regression target that goes with :meth:`__call__` (or :meth:`forward_latents`) for this noise.

        ``latents`` (scaled ``z_0``) and ``timesteps`` are needed only for ``v_prediction``/``sample`` schedulers.
        """
        prediction_type = str(getattr(self.scheduler, "prediction_type", "epsilon"))
        if prediction_type == "epsilon":
            return drift_noise(noise, self._drift(drift)) if self.drift_target == DriftTarget.SHIFTED else noise
        if latents is None or timesteps is None:
            raise ValueError(f"a {prediction_type} target needs the clean latents and the timesteps")
        return forward_drift(self.scheduler, latents, noise, timesteps, self._drift(drift), self.drift_target)[1]

    def forward_latents(
        self,
        latents: torch.Tensor,
        diffusion_model: Any,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        drift: Drift | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward on pre-encoded (cached, already scaled) latents; returns ``(prediction, target)``."""
        noisy, target = forward_drift(self.scheduler, latents, noise, timesteps, self._drift(drift), self.drift_target)
        if mode == "concat":
            if condition is None:
                raise ValueError("mode='concat' needs a condition")
            noisy, condition = torch.cat([noisy, condition], dim=1), None
        return diffusion_model(x=noisy, timesteps=timesteps, context=condition), target

    # -- sampling -------------------------------------------------------------------------------------------------
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
        """The parent's sampling with ``z_{t-1} = step(...) + δ`` after every step.

        ``drift=None`` uses the constructor's δ. With δ = 0 this *is* ``LatentDiffusionInferer.sample``
        (same loop, same scheduler object), hence bit-identical for the same noise, networks and scheduler.
        """
        delta = self._drift(drift)
        scheduler = scheduler or self.scheduler
        if self.drift_initial_noise:
            input_noise = drift_noise(input_noise, delta)
        return super().sample(
            input_noise=input_noise,
            autoencoder_model=autoencoder_model,
            diffusion_model=diffusion_model,
            scheduler=with_drift(scheduler, delta),
            save_intermediates=save_intermediates,
            intermediate_steps=intermediate_steps,
            conditioning=conditioning,
            mode=mode,
            verbose=verbose,
            seg=seg,
            cfg=cfg,
            cfg_fill_value=cfg_fill_value,
        )

    # -- encode / decode as the parent does ---------------------------------------------------------------------------
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

    # -- one denoiser evaluation with optional classifier-free guidance ----------------------------------------------
    @staticmethod
    def predict(
        diffusion_model: Any,
        latents: torch.Tensor,
        timestep: Any,
        conditioning: torch.Tensor | None,
        mode: str = "crossattn",
        cfg: float | None = None,
        cfg_fill_value: float = -1.0,
        uncondition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ε̂ (or v̂) for ``latents`` at ``timestep``, guided as ``ε_u + w (ε_c - ε_u)`` when ``cfg`` is set.

        ``uncondition`` defaults to the conditioning filled with ``cfg_fill_value`` (MONAI's convention).
        """
        t = torch.as_tensor(timestep, device=latents.device).reshape(1).float()
        if cfg is not None and conditioning is not None:
            if uncondition is None:
                uncondition = torch.full_like(conditioning, cfg_fill_value)
            model_input = torch.cat([latents] * 2, dim=0)
            cond = torch.cat([uncondition, conditioning], dim=0)
        else:
            model_input, cond = latents, conditioning
        if mode == "concat" and cond is not None:
            out = diffusion_model(torch.cat([model_input, cond], dim=1), timesteps=t, context=None)
        else:
            out = diffusion_model(model_input, timesteps=t, context=cond)
        if cfg is not None and conditioning is not None:
            out_u, out_c = out.chunk(2)
            out = out_u + cfg * (out_c - out_u)
        return out

    # -- inversion ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(
        self,
        diffusion_model: Any,
        inputs: torch.Tensor | None = None,
        autoencoder_model: Any | None = None,
        latents: torch.Tensor | None = None,
        conditioning: torch.Tensor | None = None,
        strength: float = 1.0,
        mode: str = "crossattn",
        scheduler: DDIMScheduler | None = None,
        drift: Drift = 0.0,
        cfg: float | None = None,
        cfg_fill_value: float = -1.0,
        verbose: bool = False,
    ) -> InversionOutput:
        """Deterministic DDIM inversion of an image (``inputs`` + ``autoencoder_model``) or of ``latents``; with an
        ``RFlowScheduler`` the flow ODE run backwards (:func:`monai_ld.schedulers.rflow_inversion_step`).

        Args:
            strength: fraction of the scheduler's inference steps to invert (1 = all the way to noise).
            drift: δ added after every inversion step (0, the default, inverts the plain model; the public
                re-implementation adds the sampling δ here too; ``-δ`` is the exact inverse of drifted sampling).
            cfg: guidance scale during inversion (None: the plain conditional model, the usual choice).

        Returns:
            :class:`InversionOutput`; denoising ``latent`` over ``timesteps`` with the same condition returns close
            to ``clean_latent``.
        """
        scheduler = scheduler or self.scheduler
        rflow = is_rflow(scheduler)
        if not isinstance(scheduler, DDIMScheduler) and not rflow:
            raise ValueError(f"DDIM inversion needs a DDIMScheduler (flow inversion an RFlowScheduler), got {type(scheduler).__name__}; use abduction='noising'")
        if latents is None:
            if inputs is None or autoencoder_model is None:
                raise ValueError("invert needs either latents, or inputs together with autoencoder_model")
            latents = self.encode(inputs, autoencoder_model)
        timesteps = strength_timesteps(scheduler, strength)
        z = latents
        steps = timesteps.flip(0)
        iterator = steps
        if verbose:
            from tqdm import tqdm

            iterator = tqdm(steps, desc="invert")
        lower = next_timesteps(timesteps).flip(0)  # RFlow: the level each inversion step starts from
        for i, t in enumerate(iterator):
            eps = self.predict(diffusion_model, z, t, conditioning, mode, cfg, cfg_fill_value)
            z = rflow_inversion_step(scheduler, eps, t, lower[i], z) if rflow else ddim_inversion_step(scheduler, eps, int(t), z)
            z = apply_step_drift(z, drift)
        return InversionOutput(latent=z, timesteps=timesteps, clean_latent=latents)

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        diffusion_model: Any,
        timesteps: torch.Tensor,
        conditioning: torch.Tensor | None = None,
        mode: str = "crossattn",
        scheduler: Any | None = None,
        cfg: float | None = None,
        cfg_fill_value: float = -1.0,
        drift: Drift | None = None,
        uncondition: torch.Tensor | None = None,
        verbose: bool = False,
        blend: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
        trajectory: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the reverse process over ``timesteps`` (descending) from ``latents``, with LD δ after every step.

        ``blend=(mask, reference)``: after step ``i`` keep ``reference[i]`` where ``mask`` is 0 (a localised edit);
        ``trajectory``: a list that receives the latent after every step.
        """
        scheduler = with_drift(scheduler or self.scheduler, self._drift(drift))
        # RFlow's step needs the level it lands on; a partial run (strength < 1) ends at 0 like a full one
        nexts = next_timesteps(timesteps) if is_rflow(scheduler) else None
        iterator = timesteps
        if verbose:
            from tqdm import tqdm

            iterator = tqdm(timesteps, desc="denoise")
        z = latents
        for i, t in enumerate(iterator):
            out = self.predict(diffusion_model, z, t, conditioning, mode, cfg, cfg_fill_value, uncondition)
            z, _ = scheduler.step(out, t, z) if nexts is None else scheduler.step(out, t, z, nexts[i])
            if blend is not None:
                z = blend[0] * z + (1 - blend[0]) * blend[1][i]
            if trajectory is not None:
                trajectory.append(z)
        return z

    @torch.no_grad()
    def edit_mask(
        self,
        diffusion_model: Any,
        latents: torch.Tensor,
        source_condition: torch.Tensor,
        target_condition: torch.Tensor,
        timestep: Any,
        threshold: float = 0.5,
        samples: int = 4,
        mode: str = "crossattn",
        scheduler: Any | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DiffEdit's mask: where the condition changes the noise prediction.

        ``latents`` ``(B, C, *spatial)`` are noised to ``timestep`` with ``samples`` noise draws; the channel-mean
        ``|ε(z, target) - ε(z, source)|``, averaged over the draws and divided by its per-sample maximum, is
        thresholded at ``threshold`` (in ``(0, 1)``; higher = smaller region). Returns a ``{0, 1}`` mask
        ``(B, 1, *spatial)``.
        """
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"mask threshold must be in (0, 1) (DiffEdit uses 0.5), got {threshold}")
        if int(samples) < 1:
            raise ValueError(f"mask samples must be >= 1, got {samples}")
        scheduler = scheduler or self.scheduler
        t = torch.as_tensor(timestep, device=latents.device).reshape(1).long().expand(latents.shape[0])
        acc = torch.zeros((latents.shape[0], 1, *latents.shape[2:]), device=latents.device)
        for _ in range(int(samples)):
            noise = _randn(latents.shape, generator, latents.dtype, latents.device)
            z = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=t)
            e_t = self.predict(diffusion_model, z, t[0], target_condition, mode)
            e_s = self.predict(diffusion_model, z, t[0], source_condition, mode)
            acc += (e_t - e_s).abs().mean(1, keepdim=True)
        peak = acc.flatten(1).amax(1).clamp_min(1e-12).reshape(-1, *[1] * (acc.ndim - 1))
        return (acc / peak > float(threshold)).to(latents.dtype)

    # -- counterfactuals ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def counterfactual(
        self,
        inputs: torch.Tensor,
        autoencoder_model: Any,
        diffusion_model: Any,
        source_condition: torch.Tensor | None,
        target_condition: torch.Tensor,
        strength: float = 0.5,
        guidance_scale: float | None = 3.0,
        drift: Drift | None = None,
        inversion_drift: Drift = 0.0,
        scheduler: DDIMScheduler | None = None,
        mode: str = "crossattn",
        abduction: Abduction | str = Abduction.INVERSION,
        composition: Composition | str = Composition.NONE,
        cfg_fill_value: float = -1.0,
        generator: torch.Generator | None = None,
        verbose: bool = False,
        mask_threshold: float | None = None,
        mask_samples: int = 4,
    ) -> CounterfactualOutput:
        """What ``inputs`` would look like under ``target_condition`` (abduction -> action -> prediction).

        Args:
            inputs: images ``(B, C, H, W[, D])`` with spatial size the autoencoder accepts.
            source_condition: the inputs' own condition, or ``None`` to abduct under the null (unconditional)
                condition (a tensor like ``target_condition`` filled with ``cfg_fill_value``).
            target_condition: the intervened condition (cross-attention ``(B, 1, dim)`` or concat channels).
            strength: fraction of the inference steps inverted and re-generated (0 = reconstruction only).
            guidance_scale: classifier-free guidance ``w`` while generating under the target (None = no CFG).
            drift: LD δ while generating (None = the constructor's δ).
            inversion_drift: δ added during inversion (see :meth:`invert`).
            abduction: ``"inversion"`` (deterministic DDIM) or ``"noising"`` (stochastic, uses ``generator``; a list
                of generators, one per batch item, gives each item its own seed).
            composition: ``"none"``, ``"residual"`` (``x + D(z'_0) - D(z_0)``) or ``"paired"``
                (``x + D(z'_0) - D(z^s_0)``, ``z^s_0`` denoised from the same ``z_t`` under the source condition).
            mask_threshold: localise the edit (DiffEdit, :meth:`edit_mask`): steps outside the mask follow the
                source trajectory ``z^s``. None (default): no mask. ``mask_samples``: noise draws for the mask.

        Returns:
            :class:`CounterfactualOutput` with ``image`` of the same shape and dtype as ``inputs``.
        """
        abduction, composition = Abduction(abduction), Composition(composition)
        scheduler = scheduler or self.scheduler
        if inputs.ndim not in (4, 5):
            raise ValueError(f"inputs must be (B, C, H, W) or (B, C, H, W, D), got shape {tuple(inputs.shape)}")
        if target_condition is None:
            raise ValueError("target_condition is required (the counterfactual's attributes)")
        if target_condition.shape[0] != inputs.shape[0]:
            raise ValueError(f"target_condition batch {target_condition.shape[0]} != inputs batch {inputs.shape[0]}")
        if source_condition is None:
            source_condition = torch.full_like(target_condition, cfg_fill_value)
        elif source_condition.shape != target_condition.shape:
            raise ValueError(f"source_condition {tuple(source_condition.shape)} and target_condition {tuple(target_condition.shape)} differ in shape")
        delta = self._drift(drift)
        work = inputs.float()

        z0 = self.encode(work, autoencoder_model)
        reconstruction = self.decode(z0, autoencoder_model)
        factor = 2 ** (len(getattr(diffusion_model, "block_out_channels", [0])) - 1)
        if reconstruction.shape != inputs.shape or any(s % factor for s in z0.shape[2:]):
            raise ValueError(
                f"input spatial shape {tuple(inputs.shape[2:])} does not fit the networks (autoencoder output "
                f"{tuple(reconstruction.shape[2:])}, latent {tuple(z0.shape[2:])}, UNet needs latent sizes a multiple of "
                f"{factor}); pad/crop inputs to a multiple of the total downsampling"
            )
        if abduction == Abduction.INVERSION:
            inv = self.invert(diffusion_model, latents=z0, conditioning=source_condition, strength=strength, mode=mode,
                              scheduler=scheduler, drift=inversion_drift, cfg_fill_value=cfg_fill_value, verbose=verbose)
            zt, timesteps = inv.latent, inv.timesteps
        else:
            timesteps = strength_timesteps(scheduler, strength)
            if len(timesteps) == 0:
                zt = z0
            else:
                noise = _randn(z0.shape, generator, z0.dtype, z0.device)
                t0 = timesteps[:1].to(z0.device).expand(z0.shape[0])
                zt = scheduler.add_noise(original_samples=z0, noise=drift_noise(noise, delta) if self.drift_initial_noise else noise, timesteps=t0)

        mask = None
        if mask_threshold is not None and len(timesteps):
            mask = self.edit_mask(diffusion_model, z0, source_condition, target_condition, timesteps[0], mask_threshold,
                                  mask_samples, mode, scheduler, generator)
        baseline, source_path = reconstruction, None
        if composition == Composition.PAIRED or mask is not None:
            # the same z_t, guidance, drift and step noise under the source condition: what the generator alone makes
            # (the paired baseline) and the trajectory a masked edit keeps outside its mask. Both runs draw the same
            # noise from the same RNG state, so which goes first changes nothing.
            rng = _rng_state(zt.device)
            source_path = [] if mask is not None else None
            z_src = self.denoise(zt, diffusion_model, timesteps, source_condition, mode, scheduler, guidance_scale,
                                 cfg_fill_value, delta, verbose=verbose, trajectory=source_path)
            if composition == Composition.PAIRED:
                baseline = self.decode(z_src, autoencoder_model)
            _rng_state(zt.device, rng)
        z_cf = self.denoise(zt, diffusion_model, timesteps, target_condition, mode, scheduler, guidance_scale,
                            cfg_fill_value, delta, verbose=verbose, blend=None if mask is None else (mask, source_path))
        decoded = self.decode(z_cf, autoencoder_model)
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
                "drift": float(delta) if not isinstance(delta, torch.Tensor) else delta.tolist(),
                "inversion_drift": float(inversion_drift) if not isinstance(inversion_drift, torch.Tensor) else inversion_drift.tolist(),
                "abduction": str(abduction),
                "composition": str(composition),
                "source": "null" if bool((source_condition == cfg_fill_value).all()) else "given",
                "mask_threshold": None if mask_threshold is None else float(mask_threshold),
            },
        )

