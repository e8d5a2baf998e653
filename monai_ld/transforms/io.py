"""Reading images with the right MONAI reader (and one clear error when a file is unreadable), writing them back.

MONAI's :class:`~monai.transforms.LoadImage` picks a reader by file suffix from the readers it has; with ``itk`` not
installed (the default install here), DICOM series fall through to readers that cannot read them and NRRD/DICOM
errors come out as long reader-specific tracebacks. :class:`LoadMedicalImage` chooses the reader explicitly:

============================================  ==========================================
input                                         reader
============================================  ==========================================
directory (a DICOM series) or ``*.dcm``        :class:`monai.data.PydicomReader`
``*.nrrd``, ``*.nhdr``                        :class:`monai.data.NrrdReader`
``*.nii``, ``*.nii.gz``, ``*.hdr``/``*.img``   :class:`monai.data.NibabelReader`
``*.png``, ``*.jpg``, ``*.jpeg``, ``*.bmp``    :class:`monai.data.PILReader`
other file starting with a DICOM preamble     :class:`monai.data.PydicomReader`
============================================  ==========================================

and turns any failure into an :class:`ImageLoadError` that names the file. :func:`save_like_input` writes a
result as NIfTI with the input's affine, atomically, and never over an input file.
"""

from __future__ import annotations

from ..utils import atomic_write

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader, NrrdReader, PILReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.transforms import LoadImage, MapTransform, Transform

__all__ = [
    "ImageLoadError",
    "ACCEPTED_FORMATS",
    "select_reader",
    "LoadMedicalImage",
    "LoadMedicalImaged",
    "save_like_input",
]

ACCEPTED_FORMATS = "NIfTI (.nii, .nii.gz, .hdr/.img), NRRD (.nrrd, .nhdr), DICOM (.dcm file or a series directory), PNG/JPEG/BMP"

_NIFTI = (".nii", ".nii.gz", ".hdr", ".img")
_NRRD = (".nrrd", ".nhdr")
_PIL = (".png", ".jpg", ".jpeg", ".bmp")
_DICOM = (".dcm", ".dicom", ".ima")


class ImageLoadError(RuntimeError):
    """An input image could not be read; the message names the file, the reader and the accepted formats."""


def _lower_name(path: Path) -> str:
    return path.name.lower()


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def select_reader(path: str | os.PathLike, dicom_prune_metadata: bool = True) -> ImageReader:
    """The MONAI reader for ``path`` (see the module table).

    Args:
        path: a file, or a directory holding one DICOM series.
        dicom_prune_metadata: passed to :class:`~monai.data.PydicomReader` as ``prune_metadata``; ``False`` keeps every
            DICOM tag in the metadata (needed e.g. for ``PhotometricInterpretation``).

    Raises:
        ImageLoadError: the path does not exist or has an unsupported format.
    """
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(f"image file '{p}' does not exist. Accepted: {ACCEPTED_FORMATS}")
    if p.is_dir():
        return PydicomReader(prune_metadata=dicom_prune_metadata, fname_regex=None)
    name = _lower_name(p)
    if name.endswith(_DICOM):
        return PydicomReader(prune_metadata=dicom_prune_metadata)
    if name.endswith(_NRRD):
        return NrrdReader()
    if name.endswith(_NIFTI):
        return NibabelReader()
    if name.endswith(_PIL):
        return PILReader()
    if _is_dicom_file(p):
        return PydicomReader(prune_metadata=dicom_prune_metadata)
    raise ImageLoadError(f"image file '{p}': unsupported format '{p.suffix or p.name}'. Accepted: {ACCEPTED_FORMATS}")


class LoadMedicalImage(Transform):
    """Load one image (file or DICOM series directory) as a :class:`~monai.data.MetaTensor` with its affine.

    Wraps :class:`monai.transforms.LoadImage` with the reader from :func:`select_reader`. The output is the reader's
    array: ``(H, W[, D])`` for a single-channel image (add :class:`~monai.transforms.EnsureChannelFirst` to get
    ``(C, H, W[, D])``), or ``(C, H, W[, D])`` directly with ``ensure_channel_first=True``.

    Args:
        ensure_channel_first: move/add the channel dimension first.
        dtype: output dtype (default ``float32``).
        dicom_prune_metadata: see :func:`select_reader`.

    Raises:
        ImageLoadError: missing/unsupported/corrupt file; the message names the file.
    """

    def __init__(self, ensure_channel_first: bool = False, dtype: Any = np.float32, dicom_prune_metadata: bool = True):
        self.dicom_prune_metadata = dicom_prune_metadata
        self._loader = LoadImage(image_only=True, dtype=dtype, ensure_channel_first=ensure_channel_first)

    def __call__(self, filename: str | os.PathLike) -> MetaTensor:
        if isinstance(filename, (list, tuple)):
            raise ImageLoadError(f"expected one image path (a file or a DICOM series directory), got a list of {len(filename)}")
        reader = select_reader(filename, self.dicom_prune_metadata)
        rname = type(reader).__name__
        try:
            img = self._loader(filename, reader=reader)
        except ImageLoadError:
            raise
        except Exception as e:  # every reader fails differently; one message that names the file
            raise ImageLoadError(
                f"could not read image '{filename}' with {rname}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                f"The file may be corrupt or truncated. Accepted: {ACCEPTED_FORMATS}"
            ) from e
        if Path(filename).is_dir():
            n = img.shape[-1] if img.ndim >= 3 else 1
            if img.ndim < 3 or n < 2:
                raise ImageLoadError(f"DICOM directory '{filename}' holds no multi-slice series (read {n} slice(s))")
        return img


class LoadMedicalImaged(MapTransform):
    """Dictionary wrapper of :class:`LoadMedicalImage`: replaces each path under ``keys`` by the loaded image."""

    def __init__(
        self,
        keys: KeysCollection,
        ensure_channel_first: bool = False,
        dtype: Any = np.float32,
        dicom_prune_metadata: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMedicalImage(ensure_channel_first, dtype, dicom_prune_metadata)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


def _input_paths(meta: Mapping | None) -> list[Path]:
    if not meta:
        return []
    src = meta.get("filename_or_obj")
    if src is None:
        return []
    srcs = src if isinstance(src, (list, tuple)) else [src]
    return [Path(str(s)).resolve() for s in srcs]


def save_like_input(
    image: torch.Tensor | np.ndarray,
    output_path: str | os.PathLike,
    affine: np.ndarray | torch.Tensor | None = None,
    reference: MetaTensor | None = None,
    overwrite: bool = False,
    dtype: Any = np.float32,
) -> Path:
    """Write ``image`` as NIfTI with the input's affine, atomically (temporary file + ``os.replace``).

    Args:
        image: ``(C, H, W, D)`` / ``(C, H, W)`` with ``C == 1`` (squeezed) or ``(H, W[, D])``; a MetaTensor already
            restored to the input space (see :func:`restore_to_input_space`) carries the affine itself.
        output_path: ``.nii`` or ``.nii.gz`` file to write.
        affine: 4x4 world affine (RAS, the NIfTI convention); default: ``image.affine`` or ``reference.affine``.
        reference: the loaded input (its ``filename_or_obj`` is protected from being overwritten).
        overwrite: allow replacing an existing output (never an input file).
        dtype: on-disk dtype.

    Raises:
        ValueError: output would overwrite an input file, exists already, or has the wrong suffix.
    """
    out = Path(output_path)
    if not str(out).lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"save_like_input writes NIfTI; '{out}' must end with .nii or .nii.gz")
    protected = _input_paths(getattr(image, "meta", None)) + _input_paths(getattr(reference, "meta", None))
    resolved = out.resolve()
    for p in protected:
        if resolved == p or (p.is_dir() and p in resolved.parents):
            raise ValueError(f"refusing to write '{out}': it would overwrite the input '{p}'")
    if out.exists() and not overwrite:
        raise ValueError(f"'{out}' exists; pass overwrite=True to replace it (inputs are never overwritten)")
    if affine is None:
        src = image if isinstance(image, MetaTensor) else reference
        if src is None:
            raise ValueError("save_like_input needs an affine: pass `affine`, a MetaTensor image, or `reference`")
        affine = src.affine
    aff = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = np.asarray(arr)
    if arr.ndim in (3, 4) and arr.shape[0] == 1 and arr.ndim - 1 >= 2:
        arr = arr[0]
    elif arr.ndim == 4:
        arr = np.moveaxis(arr, 0, -1)  # multi-channel: channels last, as NIfTI stores them
    if aff.shape != (4, 4):
        full = np.eye(4)
        r = aff.shape[0] - 1
        full[:r, :r], full[:r, 3] = aff[:r, :r], aff[:r, r]
        aff = full
    out.parent.mkdir(parents=True, exist_ok=True)
    nii = nib.Nifti1Image(arr.astype(dtype), aff)
    nii.set_qform(aff, code=1)
    nii.set_sform(aff, code=1)
    suffix = ".nii.gz" if str(out).lower().endswith(".nii.gz") else ".nii"
    atomic_write(out, lambda tmp: nib.save(nii, tmp), suffix=".tmp" + suffix)
    return out
