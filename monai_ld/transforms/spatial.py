"""Slice extraction for 2D models trained on 3D scans (MONAI has no invertible single-slice transform)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.transforms.utils_pytorch_numpy_unification import moveaxis
from monai.utils import TraceKeys, convert_to_tensor

__all__ = ["ExtractSlice", "ExtractSliced"]


class ExtractSlice(InvertibleTransform):
    """Take one slice of a volume: ``(C, H, W, D)`` -> ``(C, H, W)`` (``spatial_axis=2``, axial after RAS reorientation).

    The output affine maps the slice's pixel ``(i, j)`` to its world position: the two kept columns of the volume
    affine, the slice offset folded into the translation, and the dropped axis kept as the third column (so the 4x4
    stays invertible).

    Inverse: the slice is put back at its index in a volume of the original shape; every other slice is
    ``fill_value`` (a 2D model only produces this slice). The original affine is restored, so the following geometric
    inverses (resize/pad, spacing, orientation) place it in the input space.

    Args:
        spatial_axis: 0, 1 or 2 (spatial axis, channel excluded).
        index: slice index; ``None`` = the middle slice ``D // 2``; negative counts from the end.
        fill_value: value of the non-extracted slices on inversion.
    """

    def __init__(self, spatial_axis: int = 2, index: int | None = None, fill_value: float = 0.0):
        if spatial_axis not in (0, 1, 2, -1, -2, -3):
            raise ValueError(f"spatial_axis must be 0, 1 or 2, got {spatial_axis}")
        self.spatial_axis = spatial_axis % 3
        self.index = index
        self.fill_value = float(fill_value)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=True)
        if img.ndim != 4:
            raise ValueError(f"ExtractSlice expects a channel-first volume (C, H, W, D), got shape {tuple(img.shape)}")
        n = img.shape[self.spatial_axis + 1]
        idx = n // 2 if self.index is None else int(self.index)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise ValueError(f"slice index {self.index} is outside 0..{n - 1} along spatial axis {self.spatial_axis}")
        orig_shape = tuple(int(s) for s in img.shape[1:])
        out = img.select(self.spatial_axis + 1, idx).contiguous()
        if isinstance(img, MetaTensor):
            out = MetaTensor(out.as_tensor() if isinstance(out, MetaTensor) else out, meta=dict(img.meta),
                             applied_operations=list(img.applied_operations))
            aff = img.affine.to(torch.float64)
            keep = [a for a in range(3) if a != self.spatial_axis]
            new = torch.eye(4, dtype=torch.float64)
            new[:3, 0], new[:3, 1], new[:3, 2] = aff[:3, keep[0]], aff[:3, keep[1]], aff[:3, self.spatial_axis]
            new[:3, 3] = aff[:3, 3] + idx * aff[:3, self.spatial_axis]
            out.affine = new
            out.meta["spatial_shape"] = tuple(out.shape[1:])
            self.push_transform(out, orig_size=orig_shape,
                                extra_info={"index": idx, "spatial_axis": self.spatial_axis, "affine": aff.clone()})
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        info = transform[TraceKeys.EXTRA_INFO]
        orig = tuple(int(s) for s in transform[TraceKeys.ORIG_SIZE])
        axis, idx = int(info["spatial_axis"]), int(info["index"])
        expected = tuple(s for a, s in enumerate(orig) if a != axis)
        if tuple(data.shape[1:]) != expected:
            raise ValueError(f"ExtractSlice.inverse: slice shape {tuple(data.shape[1:])} != extracted {expected}")
        vol = torch.full((data.shape[0], *orig), self.fill_value, dtype=data.dtype)
        moveaxis(vol, axis + 1, -1)[..., idx] = data.as_tensor() if isinstance(data, MetaTensor) else data
        if isinstance(data, MetaTensor):
            vol = MetaTensor(vol, meta=dict(data.meta), applied_operations=list(data.applied_operations))
            vol.affine = torch.as_tensor(info["affine"], dtype=torch.float64)
            vol.meta["spatial_shape"] = orig
        return vol


class ExtractSliced(MapTransform, InvertibleTransform):
    """Dictionary wrapper of :class:`ExtractSlice`."""

    def __init__(self, keys: KeysCollection, spatial_axis: int = 2, index: int | None = None, fill_value: float = 0.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.extractor = ExtractSlice(spatial_axis, index, fill_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.extractor(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.extractor.inverse(d[key])
        return d
