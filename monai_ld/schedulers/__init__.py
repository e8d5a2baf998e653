"""Scheduler helpers below the inferers: rectified-flow timesteps and flow inversion."""

from .rflow import following_timestep, is_rflow, next_timesteps, rflow_inversion_step

__all__ = ["following_timestep", "is_rflow", "next_timesteps", "rflow_inversion_step"]
