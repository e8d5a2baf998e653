"""Input checks and atomic file writes shared by the evaluation modules (private)."""

from __future__ import annotations

import torch

from ..utils import atomic_write  # noqa: F401  (re-exported)

__all__ = ["EvaluationError", "check_images", "check_pair", "check_features", "check_feature_sets", "atomic_write", "to_float"]


class EvaluationError(ValueError):
    """Inputs to a metric are unusable (wrong shape, mismatched sets, too few samples); the message says why."""


def check_images(x: torch.Tensor, name: str = "images", spatial_dims: int | None = None) -> torch.Tensor:
    """Check ``x`` is a ``(B, C, *spatial)`` float tensor with 2 or 3 spatial dims; return it as float."""
    if not isinstance(x, torch.Tensor):
        raise EvaluationError(f"{name} must be a torch.Tensor of shape (B, C, H, W[, D]), got {type(x).__name__}")
    if x.ndim not in (4, 5):
        raise EvaluationError(f"{name} must have shape (B, C, H, W) or (B, C, H, W, D), got {tuple(x.shape)}")
    if spatial_dims is not None and x.ndim - 2 != spatial_dims:
        raise EvaluationError(f"{name} has {x.ndim - 2} spatial dims {tuple(x.shape)}, expected spatial_dims={spatial_dims}")
    if x.shape[0] < 1:
        raise EvaluationError(f"{name} is empty: {tuple(x.shape)}")
    return x if x.is_floating_point() else x.float()


def check_pair(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str] = ("x", "y")) -> tuple[torch.Tensor, torch.Tensor]:
    """Two image batches of identical shape ``(B, C, *spatial)``."""
    x = check_images(x, names[0])
    y = check_images(y, names[1])
    if x.shape != y.shape:
        raise EvaluationError(f"{names[0]} {tuple(x.shape)} and {names[1]} {tuple(y.shape)} must have the same shape")
    return x, y


def check_features(f: torch.Tensor, name: str, min_samples: int = 2) -> torch.Tensor:
    """A ``(N, F)`` feature matrix with ``N >= min_samples``, returned as float64."""
    if not isinstance(f, torch.Tensor):
        raise EvaluationError(f"{name} must be a (N, F) torch.Tensor of features, got {type(f).__name__}")
    if f.ndim != 2:
        raise EvaluationError(
            f"{name} must be features of shape (N, F), got {tuple(f.shape)}; run images through a feature network first"
        )
    if f.shape[0] < min_samples:
        raise EvaluationError(f"{name} has {f.shape[0]} samples; at least {min_samples} are needed")
    if not torch.isfinite(f).all():
        raise EvaluationError(f"{name} contains NaN or inf")
    return f.detach().double().cpu()


def check_feature_sets(real: torch.Tensor, fake: torch.Tensor, min_samples: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    real = check_features(real, "real features", min_samples)
    fake = check_features(fake, "fake features", min_samples)
    if real.shape[1] != fake.shape[1]:
        raise EvaluationError(
            f"real features have {real.shape[1]} dims and fake features {fake.shape[1]}; they must come from the same network"
        )
    return real, fake


def to_float(v) -> float | None:
    """A Python float (None for NaN), for JSON."""
    v = float(v)
    return None if v != v else v


