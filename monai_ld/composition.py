"""Native-space composition: counterfactual = input + Δ on the input's own grid, in its own units and dtype.

The model edits a resampled, cropped, percentile-scaled copy of the input. Restoring its whole output to the input's
geometry (``output_space="model"``) brings back the model grid's blur everywhere. Here only the model's change Δ
(``CounterfactualOutput.change``: edited minus reconstructed/paired decode, on the model's grid and scale) goes back:

1. geometry: :func:`~monai_ld.transforms.restore_to_input_space` (the preprocessing trace, inverted);
2. intensity: ``Δ · (a_max − a_min) / (b_max − b_min)`` with the percentile range the chain recorded
   (:class:`~monai_ld.transforms.RecordedPercentileScale`), negated for an inverted DICOM ``MONOCHROME1`` image;
3. region: the automatic DiffEdit mask (its image-space weight restored like Δ: ``> 0`` is in), the user's edit
   mask (change only here) and keep mask (never change here), all on the input's grid;
4. ``input + Δ`` cast to the input dtype (integers rounded and clipped to the dtype's range); outside the region the
   input's own voxels, exactly.

Shapes: model-space tensors ``(N, 1, *model_spatial)`` (N samples of one input), input-space ``(C, *input_spatial)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from .settings import OUTPUT_SPACES
from .transforms import INTENSITY_RANGE_KEY, LoadMedicalImage, restore_to_input_space

__all__ = ["OUTPUT_SPACES", "STORED_DTYPE_KEY", "MaskGeometryError", "load_native", "load_mask", "intensity_scale", "compose",
           "compose_in_input_space", "mask_summary"]


class MaskGeometryError(ValueError):
    """A user mask is not on the input's grid (shape or affine differ)."""


STORED_DTYPE_KEY = "stored_dtype"
_PIL_DTYPES = {"1": "uint8", "L": "uint8", "LA": "uint8", "P": "uint8", "RGB": "uint8", "RGBA": "uint8", "I;16": "uint16",
               "I;16B": "uint16", "I;16L": "uint16", "I": "int32", "F": "float32"}


def _stored_dtype(path: Path) -> str:
    """The file's own pixel type (native byte order): the NIfTI header's (float32 when it scales its values), the PIL
    mode's for PNG/JPEG (MONAI's PIL reader gives int32 for a 16-bit PNG), else what the reader returns."""
    from PIL import Image, UnidentifiedImageError

    name = path.name.lower()
    if path.is_file() and name.endswith((".nii", ".nii.gz", ".hdr", ".img")):
        import nibabel as nib

        hdr = nib.load(str(path)).header
        slope, inter = hdr.get_slope_inter()
        if slope not in (None, 1) or inter not in (None, 0):
            return "float32"  # stored integers times a slope: the input's units are the scaled values
        return hdr.get_data_dtype().newbyteorder("=").name
    if path.is_file() and name.endswith((".png", ".jpg", ".jpeg", ".bmp")):
        try:
            with Image.open(path) as im:
                if im.mode in _PIL_DTYPES:
                    return _PIL_DTYPES[im.mode]
        except (UnidentifiedImageError, OSError):
            pass
    try:
        return str(LoadMedicalImage(dtype=None)(str(path)).dtype).replace("torch.", "")
    except Exception:  # e.g. a byte order torch cannot hold: keep float
        return "float32"


# torch lacks full uint16/uint32: hold those in the next wider signed type (values and file type unchanged)
_HOLD = {"uint16": torch.int32, "uint32": torch.int64, "float16": torch.float32}


def load_native(path: str | os.PathLike) -> MetaTensor:
    """The input as stored: ``(C, *spatial)`` with its affine (no resampling); ``meta["stored_dtype"]`` names the
    file's pixel type, the tensor holds it exactly (uint16 as int32)."""
    img = LoadMedicalImage(ensure_channel_first=True, dtype=np.float64)(str(path))  # any byte order, exact
    stored = _stored_dtype(Path(path))
    img = img.to(_HOLD.get(stored) or torch.from_numpy(np.zeros(1, dtype=stored)).dtype)
    img.meta[STORED_DTYPE_KEY] = stored
    return img


def _geometry(img: MetaTensor) -> str:
    aff = np.round(np.asarray(img.affine, dtype=np.float64), 3).tolist()
    return f"shape {tuple(img.shape[1:])}, affine {aff}"


def load_mask(path: str | os.PathLike, reference: MetaTensor, name: str = "edit") -> torch.Tensor:
    """A label image in the input's space as a boolean ``(1, *spatial)`` mask (nonzero in any channel = in).

    Raises:
        MaskGeometryError: the mask's shape or affine is not the input's (the message names both geometries).
        ValueError: an empty edit mask (nothing may change).
    """
    mask = load_native(path)
    same = tuple(mask.shape[1:]) == tuple(reference.shape[1:]) and np.allclose(
        np.asarray(mask.affine, dtype=np.float64), np.asarray(reference.affine, dtype=np.float64), atol=1e-3)
    if not same:
        ref = reference.meta.get("filename_or_obj", "the input")
        raise MaskGeometryError(f"{name} mask '{path}' ({_geometry(mask)}) is not on the grid of the input '{ref}' "
                                f"({_geometry(reference)}): give a label image with the input's shape and affine "
                                "(resample it to the input with nearest-neighbour interpolation)")
    out = (mask.as_tensor() != 0).any(0, keepdim=True)
    if name == "edit" and not bool(out.any()):
        raise ValueError(f"edit mask '{path}' is empty: nothing would change (nonzero voxels mark where the edit may go)")
    return out


def intensity_scale(preprocessed: MetaTensor) -> float:
    """Input units per model unit: ``(a_max − a_min) / (b_max − b_min)`` of the recorded percentile scaling,
    negative for an inverted ``MONOCHROME1`` radiograph."""
    rng = getattr(preprocessed, "meta", {}).get(INTENSITY_RANGE_KEY)
    if rng is None:
        raise ValueError("the preprocessing recorded no intensity range (meta['intensity_range']), so the model's change "
                         "cannot be put in the input's units; use output_space='model'")
    a_min, a_max, b_min, b_max = (float(v) for v in rng)
    scale = (a_max - a_min) / (b_max - b_min)
    return -scale if preprocessed.meta.get("inverted_monochrome1") else scale


def compose(native: MetaTensor, delta: torch.Tensor, region: torch.Tensor | None = None) -> MetaTensor:
    """``native + delta`` in the input's dtype (integers rounded and clipped to the stored dtype's range, e.g.
    ``[0, 65535]`` for a 16-bit PNG), exactly ``native`` outside ``region``.

    Args:
        native: the input as stored, ``(C, *spatial)``.
        delta: ``(1 or C, *spatial)`` in the input's units (one channel is added to every channel: RGB stays gray).
        region: boolean ``(1, *spatial)``, or None (everywhere).
    """
    x = native.as_tensor()
    y = x.double() + delta.double()  # float64: int32 inputs and float32 sums stay exact enough
    if x.dtype.is_floating_point:
        y = y.to(x.dtype)
    elif x.dtype == torch.bool:
        y = y.round().clamp(0, 1).to(torch.bool)
    else:
        info = np.iinfo(np.dtype(native.meta.get(STORED_DTYPE_KEY, str(x.dtype).replace("torch.", ""))))
        y = y.round().clamp(int(info.min), int(info.max)).to(x.dtype)
    if region is not None:
        y = torch.where(region, y, x)  # outside the edit: the input's own voxels, bit for bit
    return _on_grid(y, native)


def _on_grid(t: torch.Tensor, native: MetaTensor) -> MetaTensor:
    return MetaTensor(t, meta={**native.meta, "affine": native.affine.clone()})


def compose_in_input_space(change: torch.Tensor, data: dict[str, Any], transform: Any, native: MetaTensor,
                           weight: torch.Tensor | None = None, edit: torch.Tensor | None = None,
                           keep: torch.Tensor | None = None) -> dict[str, Any]:
    """Counterfactual, difference and uncertainty of one input on its own grid.

    Args:
        change: the model's change for N samples ``(N, 1, *model_spatial)`` (model scale); the mean over samples is
            the edit, the per-voxel standard deviation (N > 1) the uncertainty.
        data: the preprocessed data dict (``data["image"]`` carries the trace and the intensity range).
        transform: the ``Compose`` that produced ``data``.
        native: :func:`load_native` of the same file.
        weight: the automatic mask's image-space weight ``(N, 1, *model_spatial)`` (``mask_to_image``), or None.
        edit, keep: boolean user masks ``(1, *input_spatial)`` or None.

    Returns:
        ``counterfactual`` (input dtype), ``difference`` (float32, input units, exactly 0 outside the region),
        ``uncertainty`` (float32 input units, 0 outside the region; None for N = 1), ``region`` (bool or None:
        everywhere) and ``scale`` (input units per model unit).
    """
    scale = intensity_scale(data["image"])
    restore = lambda t: restore_to_input_space(t, data, transform).as_tensor().float()  # noqa: E731
    delta = restore(change.float().mean(0)) * scale
    if tuple(delta.shape[1:]) != tuple(native.shape[1:]):
        raise RuntimeError(f"the restored change {tuple(delta.shape)} is not on the input's grid {tuple(native.shape)}")
    region = None
    if weight is not None:  # any sample's mask counts: the mean change is nonzero wherever one sample's is
        region = restore(weight.float().amax(0)) > 0
    for user, keep_out in ((edit, False), (keep, True)):
        if user is not None:
            user = ~user if keep_out else user
            region = user if region is None else region & user
    cf = compose(native, delta, region)
    diff = cf.as_tensor().double() - native.as_tensor().double()
    uncertainty = None
    if change.shape[0] > 1:
        uncertainty = restore(change.float().std(0)) * abs(scale)
        if region is not None:
            uncertainty = torch.where(region, uncertainty, torch.zeros(()))
    return {"counterfactual": cf, "difference": _on_grid(diff.float(), native),
            "uncertainty": None if uncertainty is None else _on_grid(uncertainty, native), "region": region, "scale": scale}


def mask_summary(region: torch.Tensor | None, edit: Any, keep: Any, threshold: Any) -> dict[str, Any]:
    """What restricted the edit, for ``record.json``."""
    return {"edit_mask": None if edit is None else str(Path(edit).resolve()),
            "keep_mask": None if keep is None else str(Path(keep).resolve()),
            "automatic_threshold": threshold,
            "region_voxels": None if region is None else int(region.sum()),
            "region_fraction": 1.0 if region is None else round(float(region.float().mean()), 6)}
