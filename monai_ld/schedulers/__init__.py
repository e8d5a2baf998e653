"""Scheduler helpers below the inferers: DDIM inversion, rectified-flow timesteps and flow inversion."""

from .ddim import ddim_inversion_step, to_x0_eps
from .rflow import following_timestep, is_rflow, next_timesteps, rflow_inversion_step

__all__ = ["ddim_inversion_step", "following_timestep", "is_rflow", "next_timesteps", "rflow_inversion_step", "to_x0_eps"]
