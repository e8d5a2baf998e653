"""Attribute values of a manifest row -> the condition tensor a conditional UNet takes.

Per sample the code is ``(1, dim)`` (one cross-attention token), so a ``DataLoader`` batch is ``(B, 1, dim)``,
exactly :meth:`monai_ld.conditioning.AttributeEncoder.context`. For ``mode="concat"`` conditioning use
:meth:`AttributeEncoder.to_spatial` on the batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from monai_ld.conditioning import AttributeEncoder, ConditionError

__all__ = ["EncodeAttributes", "EncodeAttributesd"]


class EncodeAttributes(Transform):
    """``{name: value}`` -> code of shape ``(1, dim)`` (``squeeze=True``: ``(dim,)``).

    Args:
        encoder: the model's :class:`~monai_ld.conditioning.AttributeEncoder`.
        squeeze: return ``(dim,)`` instead of the default ``(1, dim)`` token.

    Raises:
        ConditionError: unknown/missing attribute or invalid value (message lists what is accepted).
    """

    def __init__(self, encoder: AttributeEncoder, squeeze: bool = False):
        if not isinstance(encoder, AttributeEncoder):
            encoder = AttributeEncoder(encoder)
        self.encoder = encoder
        self.squeeze = squeeze

    def __call__(self, values: Mapping[str, Any]) -> torch.Tensor:
        code = self.encoder.encode(values)
        return code if self.squeeze else code.unsqueeze(0)


class EncodeAttributesd(MapTransform):
    """Read attribute columns of a data dict (a manifest row) and store the code under ``output_key``.

    Args:
        keys: the dict keys (manifest columns) holding attribute values; ``None`` = the encoder's attribute names.
        encoder: an :class:`~monai_ld.conditioning.AttributeEncoder` (or its config list).
        output_key: where the code goes; shape ``(1, dim)`` per sample -> ``(B, 1, dim)`` after batching.
        attribute_names: the encoder attribute each key feeds, in the order of ``keys`` (default: same names).
        squeeze: store ``(dim,)`` instead of ``(1, dim)``.

    Raises:
        ConditionError: naming the sample (``subject_id``/``path`` when present) and the column at fault.
    """

    def __init__(self, keys: KeysCollection | None = None, encoder: AttributeEncoder | Sequence[Mapping] | None = None,
                 output_key: str = "condition", attribute_names: Sequence[str] | None = None, squeeze: bool = False,
                 allow_missing_keys: bool = False):
        if encoder is None:
            raise ConditionError("EncodeAttributesd needs an `encoder` (AttributeEncoder or its config list)")
        enc = encoder if isinstance(encoder, AttributeEncoder) else AttributeEncoder(encoder)
        super().__init__(keys if keys is not None else list(enc.names), allow_missing_keys)
        names = tuple(attribute_names) if attribute_names is not None else tuple(str(k) for k in self.keys)
        if len(names) != len(self.keys):
            raise ConditionError(f"attribute_names {names} must match keys {self.keys} one to one")
        unknown = [n for n in names if n not in enc.names]
        if unknown:
            raise ConditionError(f"unknown attribute(s) {unknown}; the encoder accepts: {enc.describe()}")
        missing = [n for n in enc.names if n not in names]
        if missing:
            raise ConditionError(f"no column feeds attribute(s) {missing}; the encoder needs all of {list(enc.names)}")
        self.names = names
        self.output_key = output_key
        self.coder = EncodeAttributes(enc, squeeze)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        values = {}
        for key, name in zip(self.keys, self.names):
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise ConditionError(f"{self._where(d)}: column {key!r} (attribute {name!r}) is missing")
            values[name] = d[key]
        try:
            d[self.output_key] = self.coder(values)
        except ConditionError as e:
            raise ConditionError(f"{self._where(d)}: {e}") from None
        return d

    @staticmethod
    def _where(d: Mapping) -> str:
        parts = [f"{k}={d[k]!r}" for k in ("subject_id", "path") if k in d and isinstance(d[k], (str, int))]
        return "sample " + (", ".join(parts) if parts else "(no subject_id/path)")
