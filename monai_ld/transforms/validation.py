"""One clear error for an image the model cannot take: wrong dimensionality, NaN/Inf voxels, constant/empty image."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["ImageValidationError", "ValidateImage", "ValidateImaged"]


class ImageValidationError(ValueError):
    """The image is readable but unusable; the message says what was wrong and what is accepted."""


def _source(img: Any) -> str:
    meta = getattr(img, "meta", None) or {}
    src = meta.get("filename_or_obj")
    return f"image '{src}'" if src else "image"


class ValidateImage(Transform):
    """Check a channel-first image ``(C, H, W[, D])`` and raise :class:`ImageValidationError` if it is unusable.

    Checks, in order: number of spatial dims (``spatial_dims``), number of channels (``num_channels``; a 4D NIfTI
    time series becomes ``(T, H, W, D)`` after ``EnsureChannelFirst`` and is rejected here), finite values (no
    NaN/Inf), and a non-constant image (an all-zero or constant image has no foreground to crop or normalise).

    Put it right after loading + ``EnsureChannelFirst``, before any resampling.

    Args:
        spatial_dims: 2 or 3.
        num_channels: required channel count, or ``None`` for any.
        check_finite: reject NaN/Inf.
        check_nonconstant: reject images whose max equals min.
        min_spatial_size: reject images with a spatial side shorter than this (e.g. a single-slice "volume").
    """

    def __init__(self, spatial_dims: int = 3, num_channels: int | None = 1, check_finite: bool = True,
                 check_nonconstant: bool = True, min_spatial_size: int = 2):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.num_channels = num_channels
        self.check_finite = check_finite
        self.check_nonconstant = check_nonconstant
        self.min_spatial_size = int(min_spatial_size)

    def _expected(self) -> str:
        axes = "(C, H, W, D)" if self.spatial_dims == 3 else "(C, H, W)"
        ch = f" with C={self.num_channels}" if self.num_channels is not None else ""
        kind = "a single 3D volume" if self.spatial_dims == 3 else "a single 2D image"
        return f"{kind}, channel-first {axes}{ch}"

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        name = _source(img)
        shape = tuple(img.shape)
        spatial = shape[1:]
        if len(spatial) != self.spatial_dims:
            raise ImageValidationError(
                f"{name} has {len(spatial)} spatial dimension(s) (array shape {shape}); accepted: {self._expected()}"
            )
        if self.num_channels is not None and shape[0] != self.num_channels:
            raise ImageValidationError(
                f"{name} has {shape[0]} channels/volumes (array shape {shape}), e.g. a 4D time series or multi-echo "
                f"file; accepted: {self._expected()}. Select one volume first."
            )
        small = [s for s in spatial if s < self.min_spatial_size]
        if small:
            raise ImageValidationError(
                f"{name} has spatial size {spatial}, a side shorter than {self.min_spatial_size}; accepted: {self._expected()}"
            )
        t = torch.as_tensor(img) if not isinstance(img, torch.Tensor) else img
        t = t.as_tensor() if hasattr(t, "as_tensor") else t
        if self.check_finite and t.is_floating_point():
            bad = ~torch.isfinite(t)
            n_bad = int(bad.sum())
            if n_bad:
                n_nan = int(torch.isnan(t).sum())
                raise ImageValidationError(
                    f"{name} has {n_bad} non-finite voxel(s) ({n_nan} NaN, {n_bad - n_nan} Inf) of {t.numel()}; "
                    "accepted: finite intensities only (fill or mask them before preprocessing)"
                )
        if self.check_nonconstant and t.numel() and bool(t.max() == t.min()):
            raise ImageValidationError(
                f"{name} is constant (every voxel = {float(t.flatten()[0]):g}): no foreground to crop or normalise; "
                "accepted: an image with anatomy (non-constant intensities)"
            )
        return img


class ValidateImaged(MapTransform):
    """Dictionary wrapper of :class:`ValidateImage`."""

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, num_channels: int | None = 1,
                 check_finite: bool = True, check_nonconstant: bool = True, min_spatial_size: int = 2,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.validator = ValidateImage(spatial_dims, num_channels, check_finite, check_nonconstant, min_spatial_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.validator(d[key])
        return d
