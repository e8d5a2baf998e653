"""Preprocessing chains: 3D brain MRI and 2D chest X-ray, as ``monai.transforms.Compose`` factories.

Every geometric step is a MONAI invertible transform, so :func:`monai_ld.transforms.restore_to_input_space` puts a
model output back in the input's geometry (same shape and affine). Usable from a bundle config::

    "preprocessing": {"_target_": "monai_ld.transforms.brain_mri_transforms", "spatial_size": [64, 64, 64]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Orientationd,
    ResizeWithPadOrCropd,
    Resized,
    Spacingd,
)

from monai_ld.conditioning import AttributeEncoder, ConditionError
from monai_ld.transforms.attributes import EncodeAttributesd
from monai_ld.transforms.intensity import (
    InvertMonochrome1d,
    N4BiasFieldCorrectiond,
    RecordedPercentileScaled,
    ToGrayscaled,
)
from monai_ld.transforms.io import ImageLoadError, LoadMedicalImaged
from monai_ld.transforms.spatial import ExtractSliced
from monai_ld.transforms.validation import ImageValidationError, ValidateImaged

__all__ = ["ForegroundAbove", "PreprocessCompose", "brain_mri_transforms", "build_chain", "chest_xray_transforms"]

_INPUT_ERRORS = (ImageLoadError, ImageValidationError, ConditionError)

# MONAI 1.6 warns that Orientation's default labels will change; naming today's (RAS) keeps behaviour and start-up quiet
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class PreprocessCompose(Compose):
    """A :class:`monai.transforms.Compose` that reports bad input as the one clear error that found it.

    MONAI wraps every exception raised inside a chain in ``RuntimeError("applying transform ...")`` and logs the data
    statistics; for the input errors of this package (:class:`ImageLoadError`, :class:`ImageValidationError`,
    :class:`~monai_ld.conditioning.ConditionError`) the original error is re-raised instead. Other errors (bugs) keep
    MONAI's wrapping. Inversion (``inverse``, ``Invertd``) is plain ``Compose``.
    """

    def __init__(self, transforms, **kwargs):
        kwargs.setdefault("log_stats", False)
        super().__init__(transforms, **kwargs)

    def __call__(self, input_, *args, **kwargs):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as e:
            cause = e
            while cause is not None and not isinstance(cause, _INPUT_ERRORS):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause.with_traceback(cause.__traceback__) from None


class ForegroundAbove:
    """Foreground selector for ``CropForeground``: ``x > min + fraction * (p99 - min)`` over all channels.

    MRI background is noise, not zeros, so MONAI's default ``x > 0`` keeps the whole field of view.
    """

    def __init__(self, fraction: float = 0.1):
        self.fraction = float(fraction)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(img).float()
        lo = t.min()
        hi = torch.quantile(t.flatten()[:: max(1, t.numel() // 200_000)], 0.99)
        return t > lo + self.fraction * (hi - lo)


def _encoder_step(encoder, attribute_keys, condition_key):
    if encoder is None:
        return []
    enc = encoder if isinstance(encoder, AttributeEncoder) else AttributeEncoder(encoder)
    return [EncodeAttributesd(keys=attribute_keys, encoder=enc, output_key=condition_key)]


def brain_mri_transforms(
    keys: Sequence[str] = ("image",),
    spatial_size: Sequence[int] = (64, 64, 64),
    pixdim: Sequence[float] | None = (3.0, 3.0, 3.0),
    axcodes: str = "RAS",
    n4: bool = False,
    crop_foreground: bool = True,
    foreground_fraction: float = 0.1,
    percentiles: Sequence[float] = (0.5, 99.5),
    slice_axis: int | None = None,
    slice_index: int | None = None,
    load: bool = True,
    encoder: AttributeEncoder | Sequence[Mapping] | None = None,
    attribute_keys: Sequence[str] | None = None,
    condition_key: str = "condition",
) -> PreprocessCompose:
    """3D brain MRI -> ``(1, *spatial_size)`` float32 in ``[0, 1]`` (or ``(1, H, W)`` with ``slice_axis``).

    Steps (keys ``keys``; the first key drives the foreground crop):

    1. :class:`LoadMedicalImaged` (NIfTI / NRRD / DICOM series directory; one clear error for unreadable files),
       ``EnsureChannelFirstd``;
    2. :class:`ValidateImaged`: one 3D single-channel finite non-constant volume;
    3. ``Orientationd(axcodes)``, ``Spacingd(pixdim)`` (bilinear; ``pixdim=None`` keeps the native spacing);
    4. optional :class:`N4BiasFieldCorrectiond` (intensity only);
    5. optional ``CropForegroundd`` (:class:`ForegroundAbove` threshold) and ``ResizeWithPadOrCropd(spatial_size)``
       (spacing is kept, so choose ``pixdim * spatial_size`` to cover a head: 64 x 3 mm = 192 mm);
    6. :class:`RecordedPercentileScaled` (MONAI's percentile scaling to ``[0, 1]``, clipped, recording the range in
       ``meta['intensity_range']`` for native-space composition);
    7. optional :class:`ExtractSliced` (``slice_axis`` 2 = axial after RAS) for 2D models;
    8. optional :class:`EncodeAttributesd` (``encoder`` given): ``condition_key`` holds the ``(1, dim)`` code.

    Args:
        load: include loading (False: the dict already holds channel-first MetaTensors).
        attribute_keys: dict keys holding attribute values (default: the encoder's names).
    """
    keys = list(keys)
    if len(spatial_size) != 3:
        raise ValueError(f"spatial_size must have 3 entries for a 3D chain, got {spatial_size}")
    lo, hi = percentiles
    steps: list = []
    if load:
        steps += [LoadMedicalImaged(keys), EnsureChannelFirstd(keys)]
    steps += [ValidateImaged(keys, spatial_dims=3, num_channels=1), Orientationd(keys, axcodes=axcodes, labels=RAS_LABELS)]
    if pixdim is not None:
        steps.append(Spacingd(keys, pixdim=tuple(pixdim), mode="bilinear"))
    if n4:
        steps.append(N4BiasFieldCorrectiond(keys))
    if crop_foreground:
        steps.append(CropForegroundd(keys, source_key=keys[0], select_fn=ForegroundAbove(foreground_fraction),
                                     margin=2, allow_smaller=True))
    steps += [
        ResizeWithPadOrCropd(keys, spatial_size=tuple(spatial_size)),
        RecordedPercentileScaled(keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys, dtype=torch.float32),
    ]
    if slice_axis is not None:
        steps.append(ExtractSliced(keys, spatial_axis=slice_axis, index=slice_index))
    steps += _encoder_step(encoder, attribute_keys, condition_key)
    return PreprocessCompose(steps)


def chest_xray_transforms(
    keys: Sequence[str] = ("image",),
    size: int = 128,
    percentiles: Sequence[float] = (0.5, 99.5),
    load: bool = True,
    encoder: AttributeEncoder | Sequence[Mapping] | None = None,
    attribute_keys: Sequence[str] | None = None,
    condition_key: str = "condition",
) -> PreprocessCompose:
    """2D chest radiograph (DICOM / PNG / JPEG) -> ``(1, size, size)`` float32 in ``[0, 1]``, bright = dense.

    Steps: :class:`LoadMedicalImaged` (DICOM tags kept for the photometric check), ``EnsureChannelFirstd``,
    :class:`ToGrayscaled` (RGB/RGBA -> 1 channel), :class:`InvertMonochrome1d` (DICOM ``MONOCHROME1``: bones dark
    -> inverted), :class:`ValidateImaged` (2D, finite, non-constant), ``Resized(size, size_mode="longest", area)``
    (aspect kept), ``ResizeWithPadOrCropd((size, size))`` (pad to square), percentile scaling to ``[0, 1]``, and the
    optional :class:`EncodeAttributesd`. Arrays follow MONAI's 2D convention (first spatial axis = image columns).
    """
    keys = list(keys)
    lo, hi = percentiles
    steps: list = []
    if load:
        steps += [LoadMedicalImaged(keys, dicom_prune_metadata=False), EnsureChannelFirstd(keys)]
    steps += [
        ToGrayscaled(keys),
        InvertMonochrome1d(keys),
        ValidateImaged(keys, spatial_dims=2, num_channels=1),
        Resized(keys, spatial_size=int(size), size_mode="longest", mode="area"),
        ResizeWithPadOrCropd(keys, spatial_size=(int(size), int(size))),
        RecordedPercentileScaled(keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys, dtype=torch.float32),
    ]
    steps += _encoder_step(encoder, attribute_keys, condition_key)
    return PreprocessCompose(steps)


def build_chain(preprocessing: Mapping[str, Any], encoder: Any = None):
    """The preprocessing ``Compose`` named by ``{"chain": "brain_mri"|"chest_xray", **kwargs}`` (training and inference
    share it, so a model always sees its inputs prepared the same way)."""
    kwargs = dict(preprocessing)
    chain = kwargs.pop("chain", None)
    if encoder is not None:
        kwargs["encoder"] = encoder
    if chain == "brain_mri":
        return brain_mri_transforms(**kwargs)
    if chain == "chest_xray":
        return chest_xray_transforms(**kwargs)
    raise ValueError(f"unknown preprocessing chain {chain!r}; accepted: brain_mri, chest_xray")
