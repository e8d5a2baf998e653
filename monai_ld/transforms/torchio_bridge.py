"""torchio <-> MONAI: a ``torchio.Subject`` as a MONAI data dict of MetaTensors, and back.

Both libraries hold images channel-first ``(C, W, H, D)`` with a RAS world affine (the NIfTI convention), so the
conversion is lossless: ``tensor`` and ``affine`` go across unchanged.

To run a torchio transform *inside* a MONAI chain, use MONAI's own wrappers:
``monai.transforms.TorchIOd(keys=["image"], name="RescaleIntensity", out_min_max=(0, 1))`` (and ``RandTorchIOd``).
They hand torchio plain 4D tensors, i.e. torchio sees an identity affine; that is right for intensity transforms
(``RescaleIntensity``, ``RandomBiasField``, ``RandomNoise``, ...). For torchio *spatial* transforms, whose result
depends on the affine (``Resample``, ``ToCanonical``, ``RandomAffine`` in mm), use :class:`TorchIOSubjectd`, which
passes the real affines through a ``torchio.Subject``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["subject_to_dict", "dict_to_subject", "TorchIOSubjectd"]


def subject_to_dict(subject: tio.Subject) -> dict[str, Any]:
    """``torchio.Subject`` -> MONAI dict: each ``tio.Image`` becomes a :class:`MetaTensor` ``(C, W, H, D)`` with the
    image's affine (``meta["affine"]``, float64) and ``filename_or_obj`` when the image came from a file; other
    subject entries (ages, labels, ...) are copied as they are."""
    out: dict[str, Any] = {}
    for name, value in subject.items():
        if isinstance(value, tio.Image):
            meta: dict[str, Any] = {"space": "RAS", "torchio_type": value.type}
            if value.path is not None:
                meta["filename_or_obj"] = str(value.path)
            t = MetaTensor(value.data.clone(), affine=torch.as_tensor(np.asarray(value.affine), dtype=torch.float64), meta=meta)
            t.meta["original_affine"] = t.affine.clone()
            out[name] = t
        else:
            out[name] = value
    return out


def dict_to_subject(data: Mapping[Hashable, Any], image_keys: Sequence[str] = ("image",),
                    label_keys: Sequence[str] = ()) -> tio.Subject:
    """MONAI dict -> ``torchio.Subject``: ``image_keys`` become ``tio.ScalarImage``, ``label_keys`` ``tio.LabelMap``.

    Tensors must be channel-first ``(C, W, H, D)``; a 2D ``(C, H, W)`` image gets a singleton depth, as torchio
    expects. Affines come from MetaTensors (identity for plain tensors). Non-image entries are kept as attributes.
    """
    entries: dict[str, Any] = {}
    for key, value in data.items():
        if key in image_keys or key in label_keys:
            cls = tio.LabelMap if key in label_keys else tio.ScalarImage
            t = torch.as_tensor(value.as_tensor() if isinstance(value, MetaTensor) else value)
            if t.ndim == 3:
                t = t.unsqueeze(-1)
            if t.ndim != 4:
                raise ValueError(f"dict_to_subject: '{key}' must be (C, W, H, D) or (C, H, W), got shape {tuple(t.shape)}")
            aff = np.eye(4)
            if isinstance(value, MetaTensor):
                a = value.affine.detach().cpu().numpy().astype(np.float64)
                r = a.shape[0] - 1
                aff[:r, :r], aff[:r, 3] = a[:r, :r], a[:r, r]
            entries[str(key)] = cls(tensor=t.clone(), affine=aff)
        elif isinstance(key, str) and not key.endswith(("_meta_dict", "_transforms")):
            entries[key] = value
    missing = [k for k in (*image_keys, *label_keys) if k not in data]
    if missing:
        raise KeyError(f"dict_to_subject: keys {missing} not in the data (keys: {list(data)})")
    return tio.Subject(**entries)


class TorchIOSubjectd(MapTransform):
    """Apply a torchio transform with the real affines (via a ``tio.Subject``), keeping MONAI metadata.

    Args:
        keys: image keys (``tio.ScalarImage``).
        transform: a torchio transform instance, e.g. ``tio.ToCanonical()`` or ``tio.RandomBiasField()``.
        label_keys: keys to pass as ``tio.LabelMap`` (nearest-neighbour in spatial transforms).

    The torchio step is not invertible through MONAI's ``Invertd`` (torchio keeps its own history); for geometry
    that must be undone use MONAI transforms.
    """

    def __init__(self, keys: KeysCollection, transform: tio.Transform, label_keys: Sequence[str] = (),
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = transform
        self.label_keys = tuple(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_keys = [k for k in self.key_iterator(d) if k not in self.label_keys]
        label_keys = [k for k in self.label_keys if k in d]
        subject = self.transform(dict_to_subject({k: d[k] for k in (*image_keys, *label_keys)}, image_keys, label_keys))
        for key in (*image_keys, *label_keys):
            img = subject[key]
            old = d[key]
            t = img.data
            if isinstance(old, MetaTensor) and old.ndim == 3:
                t = t[..., 0]
            meta = dict(old.meta) if isinstance(old, MetaTensor) else {}
            out = MetaTensor(t.to(torch.float32) if key not in label_keys else t, meta=meta)
            aff = torch.as_tensor(np.asarray(img.affine), dtype=torch.float64)
            out.affine = aff if (not isinstance(old, MetaTensor) or old.affine.shape[0] == 4) else old.affine
            d[key] = out
        return d
