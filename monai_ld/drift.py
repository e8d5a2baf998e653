"""Latent Drifting (LD), the idea itself: shift the diffusion process by a signed scalar δ.

- Reverse (sampling): after every scheduler step ``z_{t-1} = step(ε̂, t, z_t).prev_sample + δ``,
  i.e. ``p(z_{t-1} | z_t) = N(μθ(z_t, t) + δ, Σθ)``. :class:`DriftedScheduler` wraps any MONAI scheduler
  (DDPM, DDIM, PNDM, RFlow) so existing sampling loops, MONAI's own included, drift without being rewritten.
  For rectified flow the same rule applies to the Euler step: ``z_next = z_t + v̂·dt + δ``.
- Forward (training / fine-tuning): the noise is drawn around δ, ``ε' = ε + δ`` and ``z_t = add_noise(z_0, ε', t)``.
  What the network regresses is a choice the method's paper leaves open, so it is an option
  (:class:`DriftTarget`): the noise actually added (``shifted``, default; self-consistent with sampling from
  ``z_T ~ N(δ, I)``) or the unshifted ``ε`` (the reading of one public re-implementation). For rectified flow
  the noise endpoint is drawn around δ (``z_t = (1 - t/T)·z_0 + (t/T)·(ε + δ)``) and the velocity target
  ``z_0 - ε'`` is built from the same choice of noise.

δ is a float (one value for the whole batch) or a tensor of shape ``(B,)`` (one per sample).
"""

from __future__ import annotations

from typing import Any, Union

import torch
from monai.utils import StrEnum

from .schedulers.rflow import following_timestep, is_rflow

__all__ = [
    "DriftTarget",
    "Drift",
    "is_zero_drift",
    "as_shift",
    "apply_step_drift",
    "drift_noise",
    "forward_drift",
    "DriftedScheduler",
    "with_drift",
]

Drift = Union[float, torch.Tensor]


class DriftTarget(StrEnum):
    """What the diffusion model regresses when trained with forward drift (epsilon prediction)."""

    SHIFTED = "shifted"  # ε' = ε + δ, the noise actually added
    UNSHIFTED = "unshifted"  # ε, as if no drift had been applied


def is_zero_drift(drift: Drift | None) -> bool:
    """True when ``drift`` is None, 0, or an all-zero tensor (then every LD operation is the identity)."""
    if drift is None:
        return True
    if isinstance(drift, torch.Tensor):
        return bool((drift == 0).all())
    return float(drift) == 0.0


def as_shift(drift: Drift, like: torch.Tensor) -> torch.Tensor | float:
    """δ in a form that broadcasts against ``like`` ``(B, C, *spatial)``: a float stays a float, a ``(B,)`` tensor
    becomes ``(B, 1, ..., 1)``."""
    if not isinstance(drift, torch.Tensor):
        return float(drift)
    if drift.ndim == 0:
        return drift.to(like)
    if drift.ndim != 1 or drift.shape[0] != like.shape[0]:
        raise ValueError(f"a per-sample drift must have shape (B,)=({like.shape[0]},), got {tuple(drift.shape)}")
    return drift.to(like).reshape(-1, *([1] * (like.ndim - 1)))


def apply_step_drift(prev_sample: torch.Tensor, drift: Drift | None) -> torch.Tensor:
    """``prev_sample + δ``; returns ``prev_sample`` itself when δ is zero (keeps δ=0 bit-identical)."""
    if is_zero_drift(drift):
        return prev_sample
    return prev_sample + as_shift(drift, prev_sample)  # type: ignore[arg-type]


def drift_noise(noise: torch.Tensor, drift: Drift | None) -> torch.Tensor:
    """Forward drift of the noise: ``ε' = ε + δ`` (shape of ``noise``)."""
    return apply_step_drift(noise, drift)


def forward_drift(
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    drift: Drift | None,
    target: DriftTarget | str = DriftTarget.SHIFTED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``latents`` with drifted noise and return ``(noisy_latents, regression_target)``.

    Args:
        scheduler: a MONAI scheduler (``add_noise``, ``prediction_type``, ``get_velocity``) or ``RFlowScheduler``.
        latents: clean latents ``z_0``, ``(B, C, *spatial)``.
        noise: standard normal ``ε``, same shape.
        timesteps: ``(B,)`` integer timesteps.
        drift: δ (float or ``(B,)``).
        target: :class:`DriftTarget`; which noise the target is built from.

    Returns:
        ``z_t = add_noise(z_0, ε + δ, t)`` and the target for the scheduler's prediction type: the noise
        (``epsilon``), the velocity built from that noise (``v_prediction``) or ``z_0`` (``sample``); for
        ``RFlowScheduler`` the flow velocity ``z_0 - ε'`` (MONAI's RFlow training target) with ``ε'`` per ``target``.
    """
    target = DriftTarget(target)
    shifted = drift_noise(noise, drift)
    noisy = scheduler.add_noise(original_samples=latents, noise=shifted, timesteps=timesteps)
    eps = shifted if target == DriftTarget.SHIFTED else noise
    if is_rflow(scheduler):
        return noisy, latents - eps
    prediction_type = str(getattr(scheduler, "prediction_type", "epsilon"))
    if prediction_type == "epsilon":
        return noisy, eps
    if prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(latents, eps, timesteps)
    if prediction_type == "sample":
        return noisy, latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; accepted: epsilon, v_prediction, sample")


class DriftedScheduler:
    """Any MONAI scheduler whose ``step`` adds δ to the previous sample; every other attribute is the wrapped one's.

    Args:
        scheduler: a MONAI ``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler`` or ``RFlowScheduler``
            (timesteps already set).
        drift: δ, a float or a ``(B,)`` tensor.

    ``step(model_output, timestep, sample, ...)`` returns ``(prev_sample + δ, pred_original_sample)`` where the
    wrapped scheduler returns ``(prev_sample, pred_original_sample)``; state (timesteps, PNDM's history) stays in
    the wrapped scheduler, so ``set_timesteps`` may be called on either.

    ``RFlowScheduler.step`` takes ``next_timestep``; when the caller does not give it (a loop written for DDPM-style
    schedulers, or MONAI's inferer, which passes it only to an ``RFlowScheduler`` instance) the wrapper uses the
    inference timestep that follows ``timestep`` (0 after the last), exactly what MONAI's inferer passes to a bare
    ``RFlowScheduler``; so δ = 0 stays bit-identical to stock RFlow sampling.
    """

    def __init__(self, scheduler: Any, drift: Drift):
        if isinstance(scheduler, DriftedScheduler):
            raise ValueError("scheduler is already drifted; wrap the original scheduler once")
        self.scheduler = scheduler
        self.drift = drift

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        if not args and kwargs.get("next_timestep") is None and is_rflow(self.scheduler):
            kwargs["next_timestep"] = following_timestep(self.scheduler.timesteps, timestep)
        prev_sample, pred_original = self.scheduler.step(model_output, timestep, sample, *args, **kwargs)
        return apply_step_drift(prev_sample, self.drift), pred_original

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not defined on the wrapper itself
        return getattr(self.__dict__["scheduler"], name)

    def __repr__(self) -> str:
        return f"DriftedScheduler({type(self.scheduler).__name__}, drift={self.drift})"


def with_drift(scheduler: Any, drift: Drift | None) -> Any:
    """``scheduler`` itself when δ is zero, else a :class:`DriftedScheduler` around it."""
    return scheduler if is_zero_drift(drift) else DriftedScheduler(scheduler, drift)  # type: ignore[arg-type]
