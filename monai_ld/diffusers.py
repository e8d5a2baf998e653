"""Latent Drifting (LD) for Hugging Face diffusers schedulers and pipelines (the paper applied LD to Stable Diffusion).

- :class:`DriftedScheduler` wraps a diffusers scheduler (tested: ``DDPMScheduler``, ``DDIMScheduler``,
  ``FlowMatchEulerDiscreteScheduler``) so that ``step(...)`` returns the same output type with ``prev_sample + δ``;
  everything else (``config``, ``timesteps``, ``set_timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``order``,
  the signature of ``step`` that pipelines inspect for ``eta`` / ``generator``) is the wrapped scheduler's, so it
  drops into an existing pipeline: ``pipe.scheduler = DriftedScheduler(pipe.scheduler, 0.1)``.
- :func:`forward_drift`: the training pair of a diffusers training loop with the noise drawn around δ.
- :func:`ld_counterfactual`: an img2img-style LD edit of a real image over diffusers components (``AutoencoderKL``,
  a ``UNet2DConditionModel``-like denoiser, a scheduler), with classifier-free guidance and an explicit generator.

This module is ``monai_ld.diffusers``; with absolute imports (Python 3's only kind) ``import diffusers`` here is the
real library, not this file.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from monai_ld.conditioning import NULL_VALUE
from monai_ld.drift import Drift, DriftTarget, apply_step_drift, drift_noise, is_zero_drift
from monai_ld.schedulers.ddim import to_x0_eps

__all__ = ["DriftedScheduler", "forward_drift", "ld_counterfactual", "DiffusersCounterfactual"]


def _is_flow(scheduler: Any) -> bool:
    return isinstance(getattr(scheduler, "scheduler", scheduler), FlowMatchEulerDiscreteScheduler)


class DriftedScheduler:
    """A diffusers scheduler whose ``step`` adds δ to ``prev_sample``; every other attribute is the wrapped one's.

    Args:
        scheduler: a first-order diffusers scheduler (``order == 1``; a two-stage solver such as Heun calls ``step``
            twice per level, where "+δ after every step" has no single meaning, so it is refused).
        drift: δ, a float or a ``(B,)`` tensor (one per sample of the latent batch, not of a CFG-doubled batch).

    ``step`` returns what the wrapped ``step`` returns (a ``SchedulerOutput`` dataclass, or a tuple when
    ``return_dict=False``) with ``prev_sample`` replaced by ``prev_sample + δ``; with δ = 0 it returns the wrapped
    output object itself (bit-identical). Attribute writes go to the wrapped scheduler, so its state stays in one place.
    """

    _OWN = frozenset({"scheduler", "drift", "step"})

    def __init__(self, scheduler: Any, drift: Drift):
        if isinstance(scheduler, DriftedScheduler):
            raise ValueError("scheduler is already drifted; wrap the original scheduler once")
        if getattr(scheduler, "order", 1) != 1:
            raise ValueError(f"{type(scheduler).__name__} is a order-{scheduler.order} solver; LD adds δ after each step of a first-order scheduler")
        object.__setattr__(self, "scheduler", scheduler)
        object.__setattr__(self, "drift", drift)

        # an instance function carrying the wrapped signature: pipelines pass `eta` / `generator` only when
        # inspect.signature(scheduler.step) lists them (prepare_extra_step_kwargs)
        def step(*args: Any, **kwargs: Any) -> Any:
            return self._drifted_step(*args, **kwargs)

        step.__signature__ = inspect.signature(scheduler.step)  # type: ignore[attr-defined]
        step.__doc__ = f"{type(scheduler).__name__}.step with prev_sample + δ (δ={drift})."
        object.__setattr__(self, "step", step)

    def _drifted_step(self, *args: Any, **kwargs: Any) -> Any:
        out = self.scheduler.step(*args, **kwargs)
        if is_zero_drift(self.drift):
            return out
        if isinstance(out, tuple):
            return (apply_step_drift(out[0], self.drift), *out[1:])
        return dataclasses.replace(out, prev_sample=apply_step_drift(out.prev_sample, self.drift))

    def __getattr__(self, name: str) -> Any:
        try:  # only reached for names the wrapper lacks; copy/pickle probe before __init__ ran
            wrapped = self.__dict__["scheduler"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(wrapped, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.scheduler, name, value)

    def __len__(self) -> int:
        return len(self.scheduler)

    def __repr__(self) -> str:
        return f"DriftedScheduler({type(self.scheduler).__name__}, drift={self.drift})"


def forward_drift(
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    drift: Drift | None,
    target: DriftTarget | str = DriftTarget.SHIFTED,
    sigmas: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD forward drift for a diffusers training loop: ``(noisy_latents, regression_target)`` with ``ε' = ε + δ``.

    Args:
        scheduler: a diffusers DDPM-style scheduler (``add_noise``, ``config.prediction_type``) or a
            ``FlowMatchEulerDiscreteScheduler``.
        latents: clean (scaled) latents ``z_0``, ``(B, C, H, W)``; ``noise``: standard normal ``ε``, same shape.
        timesteps: ``(B,)`` training timesteps (for flow matching, entries of ``scheduler.timesteps``).
        drift: δ (float or ``(B,)``); ``target``: build the target from ``ε'`` (``"shifted"``) or ``ε``.
        sigmas: flow matching only: ``(B,)`` noise levels to use instead of looking ``timesteps`` up (the way
            diffusers' SD3/Flux training scripts draw them).

    Returns:
        DDPM-style: ``add_noise(z_0, ε', t)`` and ``ε`` / ``get_velocity(z_0, ε, t)`` / ``z_0`` per prediction type;
        flow matching: ``(1 - σ)·z_0 + σ·ε'`` and the velocity ``ε - z_0`` (diffusers' sign), ``ε`` as chosen.
    """
    target = DriftTarget(target)
    shifted = drift_noise(noise, drift)
    eps = shifted if target == DriftTarget.SHIFTED else noise
    if _is_flow(scheduler):
        if sigmas is None:
            noisy = scheduler.scale_noise(latents, timesteps, shifted)
        else:
            s = sigmas.to(latents).reshape(-1, *[1] * (latents.ndim - 1))
            noisy = (1.0 - s) * latents + s * shifted
        return noisy, eps - latents
    noisy = scheduler.add_noise(latents, shifted, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noisy, eps
    if prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(latents, eps, timesteps)
    if prediction_type == "sample":
        return noisy, latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@dataclass
class DiffusersCounterfactual:
    """Result of :func:`ld_counterfactual`.

    Attributes:
        image: ``D(z'_0)``, the edited decode ``(B, C, H, W)``.
        reconstruction: ``D(z_0)``, the autoencoder's reconstruction (so ``image - reconstruction`` is the edit;
            ``x + image - reconstruction`` keeps what the autoencoder cannot reproduce).
        latents: ``{"source": z_0, "inverted": z_t, "counterfactual": z'_0}``.
        settings: what was done.
    """

    image: torch.Tensor
    reconstruction: torch.Tensor
    latents: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def _predict(unet: Any, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, null: torch.Tensor | None,
             guidance_scale: float | None, unet_kwargs: dict[str, Any]) -> torch.Tensor:
    """ε̂ / v̂ at ``t``, guided as ``u + w (c - u)`` when ``guidance_scale`` is set (one batched call)."""
    if guidance_scale is None:
        return unet(z, t, encoder_hidden_states=cond, **unet_kwargs).sample
    out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([null, cond]), **unet_kwargs).sample
    u, c = out.chunk(2)
    return u + guidance_scale * (c - u)


def _ddim_invert(scheduler: DDIMScheduler, eps: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mirror of ``DDIMScheduler.step(eps, t, ·)`` (η=0): from the level it lands on back up to ``t``."""
    prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_to = scheduler.alphas_cumprod[int(t)]
    a_from = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    x0, e = to_x0_eps(scheduler.config.prediction_type, eps, z, a_from.to(z))
    return a_to.to(z) ** 0.5 * x0 + (1 - a_to.to(z)) ** 0.5 * e


@torch.no_grad()
def ld_counterfactual(
    image: torch.Tensor,
    vae: Any,
    unet: Any,
    scheduler: Any,
    source_embeds: torch.Tensor,
    target_embeds: torch.Tensor,
    strength: float = 0.5,
    num_inference_steps: int = 50,
    guidance_scale: float | None = 3.0,
    drift: Drift = 0.0,
    null_embeds: torch.Tensor | None = None,
    abduction: str = "inversion",
    generator: torch.Generator | None = None,
    unet_kwargs: dict[str, Any] | None = None,
) -> DiffusersCounterfactual:
    """What ``image`` would look like under ``target_embeds``: encode, abduct under the source, denoise under the target
    with guidance and LD drift, decode.

    Args:
        image: ``(B, C, H, W)`` in the VAE's input range (``[-1, 1]`` for Stable Diffusion's).
        vae: a diffusers ``AutoencoderKL`` (``config.scaling_factor``, optional ``config.shift_factor``).
        unet: ``unet(z, t, encoder_hidden_states=c, **unet_kwargs).sample`` (``UNet2DConditionModel``).
        scheduler: ``DDIMScheduler``, ``DDPMScheduler`` (``abduction="noising"`` only) or
            ``FlowMatchEulerDiscreteScheduler``; its timesteps are set here.
        source_embeds, target_embeds: ``(B, L, D)`` conditions (text embeddings or attribute contexts).
        strength: fraction of the ``num_inference_steps`` inverted and re-generated (0 = reconstruction).
        guidance_scale: classifier-free guidance ``w`` under the target (None = none); the unconditional branch
            uses ``null_embeds`` (default: ``target_embeds`` filled with ``monai_ld``'s null code, -1; pass the empty
            prompt's embedding for a text model).
        drift: LD δ after every denoising step.
        abduction: ``"inversion"`` (deterministic DDIM / flow ODE backwards under the source, unguided) or
            ``"noising"`` (forward noising with ``generator``).
        generator: the only randomness (noising, DDPM step noise).
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if abduction not in ("inversion", "noising"):
        raise ValueError(f"abduction must be 'inversion' or 'noising', got {abduction!r}")
    flow = _is_flow(scheduler)
    if abduction == "inversion" and not (flow or isinstance(scheduler, DDIMScheduler)):
        raise ValueError(f"inversion needs DDIMScheduler or FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}; use abduction='noising'")
    if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler)) and not flow:
        raise ValueError(f"unsupported scheduler {type(scheduler).__name__}; accepted: DDIM, DDPM, FlowMatchEulerDiscrete")
    kw = dict(unet_kwargs or {})
    if guidance_scale is not None and null_embeds is None:
        null_embeds = torch.full_like(target_embeds, NULL_VALUE)
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    z0 = (vae.encode(image).latent_dist.mean - shift) * scale
    reconstruction = vae.decode(z0 / scale + shift).sample

    scheduler.set_timesteps(num_inference_steps, device=z0.device)
    timesteps = scheduler.timesteps
    start = len(timesteps) - int(round(float(strength) * len(timesteps)))
    run = timesteps[start:]
    if len(run) == 0:
        z = z0
    elif abduction == "noising":
        noise = torch.randn(z0.shape, generator=generator, device=None if generator is None else generator.device).to(z0)
        z = scheduler.scale_noise(z0, run[:1], noise) if flow else scheduler.add_noise(z0, noise, run[:1])
    else:
        z = z0
        for i in range(len(timesteps) - 1, start - 1, -1):  # ascending noise levels
            t = timesteps[i]
            out = _predict(unet, z, t, source_embeds, None, None, kw)
            if flow:  # mirror of step: z_next = z + (σ_{i+1} - σ_i)·v̂, with v̂ taken at the current z
                z = z - (scheduler.sigmas[i + 1] - scheduler.sigmas[i]).to(z) * out
            else:
                z = _ddim_invert(scheduler, out, t, z)
    zt = z
    if flow:
        scheduler.set_begin_index(start)  # its step index starts where the partial run starts (as img2img does)
    stepper = scheduler if is_zero_drift(drift) else DriftedScheduler(scheduler, drift)
    step_kw = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in run:
        out = _predict(unet, z, t, target_embeds, null_embeds, guidance_scale, kw)
        z = stepper.step(out, t, z, **step_kw).prev_sample
    decoded = vae.decode(z / scale + shift).sample
    return DiffusersCounterfactual(
        image=decoded,
        reconstruction=reconstruction,
        latents={"source": z0, "inverted": zt, "counterfactual": z},
        settings={"strength": float(strength), "steps": len(run), "num_inference_steps": int(num_inference_steps),
                  "guidance_scale": guidance_scale, "drift": drift if not isinstance(drift, torch.Tensor) else drift.tolist(),
                  "abduction": abduction, "scheduler": type(scheduler).__name__},
    )
