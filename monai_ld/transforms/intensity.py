"""Intensity transforms MONAI lacks: N4 bias-field correction (SimpleITK), MONOCHROME1 inversion, RGB to grayscale,
percentile scaling that records the range it mapped (so a model-space change can be put back in the input's units).

All of them change intensities only: shape, affine and the ``applied_operations`` trace are untouched, so they are
invisible to :meth:`monai.transforms.Compose.inverse` / :class:`monai.transforms.Invertd` (nothing to undo
geometrically; a model output is not "un-normalised").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRangePercentiles, ScaleIntensityRangePercentilesd, Transform
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_dst_type

__all__ = [
    "N4BiasFieldCorrection",
    "N4BiasFieldCorrectiond",
    "InvertMonochrome1",
    "InvertMonochrome1d",
    "INTENSITY_RANGE_KEY",
    "RecordedPercentileScale",
    "RecordedPercentileScaled",
    "ToGrayscale",
    "ToGrayscaled",
    "photometric_interpretation",
]


def _spacing(img: Any, nd: int) -> list[float]:
    if isinstance(img, MetaTensor):
        aff = img.affine.detach().cpu().numpy().astype(np.float64)
        r = min(aff.shape[0] - 1, nd)
        sp = list(np.sqrt((aff[:r, :r] ** 2).sum(axis=0)))
        sp += [1.0] * (nd - len(sp))
        return [float(s) if s > 0 else 1.0 for s in sp]
    return [1.0] * nd


class N4BiasFieldCorrection(Transform):
    """N4 bias-field correction (Tustison et al. 2010) with SimpleITK, channel by channel.

    The field is estimated on a copy shrunk by ``shrink_factor`` (fast) inside an Otsu foreground mask, then applied
    at full resolution: ``corrected = image / exp(log_bias_field)``. Intensity only (see module docstring).

    Args:
        shrink_factor: integer downsampling for the estimate (1 = none).
        num_iterations: fitting iterations per level; the length sets the number of levels.
        num_fitting_levels: ignored when ``num_iterations`` has one entry per level.
        mask_otsu: estimate inside an Otsu foreground mask (recommended for head MRI with air background).

    Input/output: ``(C, H, W[, D])``; non-negative intensities (the image is shifted to be positive if needed).
    """

    def __init__(self, shrink_factor: int = 4, num_iterations: Sequence[int] = (50, 50, 30), mask_otsu: bool = True):
        if int(shrink_factor) < 1:
            raise ValueError(f"shrink_factor must be >= 1, got {shrink_factor}")
        self.shrink_factor = int(shrink_factor)
        self.num_iterations = [int(n) for n in num_iterations]
        self.mask_otsu = mask_otsu

    def _one(self, arr: np.ndarray, spacing: list[float]) -> np.ndarray:
        # SimpleITK indexes (x, y, z) while numpy from GetArrayFromImage is (z, y, x): transpose both ways
        offset = float(arr.min())
        shift = 1.0 - offset if offset <= 0 else 0.0
        image = sitk.GetImageFromArray(np.ascontiguousarray((arr + shift).T.astype(np.float32)))
        image.SetSpacing([float(s) for s in spacing])
        small = sitk.Shrink(image, [self.shrink_factor] * image.GetDimension()) if self.shrink_factor > 1 else image
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(self.num_iterations)
        if self.mask_otsu:
            mask = sitk.OtsuThreshold(small, 0, 1, 200)
            if sitk.GetArrayViewFromImage(mask).sum() == 0:
                mask = sitk.Image(small.GetSize(), sitk.sitkUInt8) + 1
                mask.CopyInformation(small)
            corrector.Execute(small, mask)
        else:
            corrector.Execute(small)
        log_bias = corrector.GetLogBiasFieldAsImage(image)
        corrected = sitk.GetArrayFromImage(image).T / np.exp(sitk.GetArrayFromImage(log_bias).T)
        return (corrected - shift).astype(np.float32)

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        spacing = _spacing(img, arr.ndim - 1)
        out = np.stack([self._one(arr[c].astype(np.float64), spacing) for c in range(arr.shape[0])])
        return convert_to_dst_type(out, img, dtype=img.dtype if isinstance(img, torch.Tensor) else np.float32)[0]


class N4BiasFieldCorrectiond(MapTransform):
    """Dictionary wrapper of :class:`N4BiasFieldCorrection`."""

    def __init__(self, keys: KeysCollection, shrink_factor: int = 4, num_iterations: Sequence[int] = (50, 50, 30),
                 mask_otsu: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.corrector = N4BiasFieldCorrection(shrink_factor, num_iterations, mask_otsu)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.corrector(d[key])
        return d


def photometric_interpretation(img: Any) -> str | None:
    """``PhotometricInterpretation`` (0028,0004) from a MetaTensor loaded by PydicomReader(prune_metadata=False)."""
    meta = getattr(img, "meta", None) or {}
    for key in ("00280004", "PhotometricInterpretation"):
        v = meta.get(key)
        if isinstance(v, Mapping):
            v = (v.get("Value") or [None])[0]
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return str(v).strip().upper()
    return None


class InvertMonochrome1(Transform):
    """Invert a DICOM ``MONOCHROME1`` image (bright = low value) to the ``MONOCHROME2`` convention: ``min + max - x``.

    Reads ``PhotometricInterpretation`` from the image metadata (load DICOM with ``dicom_prune_metadata=False``);
    images without it (PNG/JPEG, NIfTI) or already MONOCHROME2 pass through unchanged. After inversion the metadata
    says ``MONOCHROME2`` so running the transform twice is harmless. Shape ``(C, H, W)`` in and out.
    """

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if photometric_interpretation(img) != "MONOCHROME1":
            return img
        out = img.min() + img.max() - img
        if isinstance(out, MetaTensor):
            out.meta["00280004"] = {"vr": "CS", "Value": ["MONOCHROME2"]}
            out.meta["inverted_monochrome1"] = True
        return out


class InvertMonochrome1d(MapTransform):
    """Dictionary wrapper of :class:`InvertMonochrome1`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.inverter = InvertMonochrome1()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.inverter(d[key])
        return d


class ToGrayscale(Transform):
    """``(3 or 4, H, W)`` RGB(A) -> ``(1, H, W)`` luminance (ITU-R BT.601 weights, alpha dropped); ``(1, H, W)`` passes."""

    WEIGHTS = (0.299, 0.587, 0.114)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[0]
        if c == 1:
            return img
        if c not in (3, 4):
            raise ValueError(f"ToGrayscale expects 1 (gray), 3 (RGB) or 4 (RGBA) channels first, got shape {tuple(img.shape)}")
        w = torch.as_tensor(self.WEIGHTS, dtype=torch.float32).reshape(3, *([1] * (img.ndim - 1)))
        return (torch.as_tensor(img[:3]).float() * w).sum(0, keepdim=True) if not isinstance(img, MetaTensor) else \
            (img[:3].float() * w).sum(0, keepdim=True)


class ToGrayscaled(MapTransform):
    """Dictionary wrapper of :class:`ToGrayscale`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = ToGrayscale()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


INTENSITY_RANGE_KEY = "intensity_range"


class RecordedPercentileScale(ScaleIntensityRangePercentiles):
    """:class:`monai.transforms.ScaleIntensityRangePercentiles` (not channel-wise, not relative) that also writes the
    input range it mapped into the output's metadata, ``meta["intensity_range"] = [a_min, a_max, b_min, b_max]``.

    The percentiles depend on the image after resampling and cropping, so they cannot be recomputed from the file
    later; with them, a change ``d`` on the model's scale is ``d * (a_max - a_min) / (b_max - b_min)`` in the
    input's units (what native-space composition needs). Values are the parent's exactly. Shape ``(C, *spatial)``.
    """

    def __call__(self, img):
        out = super().__call__(img)
        if isinstance(out, MetaTensor):
            t = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            a_min, a_max = (float(percentile(t, q)) for q in (self.lower, self.upper))  # as the parent computes them
            out.meta[INTENSITY_RANGE_KEY] = [a_min, a_max, float(self.b_min), float(self.b_max)]
        return out


class RecordedPercentileScaled(ScaleIntensityRangePercentilesd):
    """Dictionary wrapper of :class:`RecordedPercentileScale` (same arguments as MONAI's ``...Percentilesd``)."""

    def __init__(self, keys: KeysCollection, lower: float, upper: float, b_min: float, b_max: float, clip: bool = False,
                 dtype: Any = np.float32, allow_missing_keys: bool = False):
        super().__init__(keys, lower, upper, b_min, b_max, clip, dtype=dtype, allow_missing_keys=allow_missing_keys)
        self.scaler = RecordedPercentileScale(lower, upper, b_min, b_max, clip, dtype=dtype)
