"""Undo the preprocessing geometry on a model output, so it can be saved in the input's space."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

__all__ = ["restore_to_input_space"]


def restore_to_input_space(output: torch.Tensor, preprocessed: Mapping[str, Any], transform: Compose,
                           key: str = "image", nearest_interp: bool = False) -> MetaTensor:
    """Invert every geometric step ``transform`` applied to ``preprocessed[key]`` on ``output``.

    Built on :class:`monai.transforms.Invertd`: the output inherits the preprocessed image's trace
    (``applied_operations``) and metadata, then each invertible transform is undone in reverse (slice re-insertion,
    pad/crop, foreground crop, spacing, orientation). Intensity steps (N4, percentile scaling) are not undone: the
    result stays on the model's intensity scale.

    Args:
        output: the model output for this sample, ``(C, H, W[, D])`` with the preprocessed image's shape (a leading
            batch dimension of size 1 is accepted and dropped).
        preprocessed: the data dict returned by ``transform`` for the input (holds the trace under ``key``).
        transform: the same ``Compose`` instance that produced ``preprocessed``.
        key: image key.
        nearest_interp: resample with nearest neighbour (for label maps).

    Returns:
        ``(C, *input_spatial_shape)`` MetaTensor whose ``affine`` is the input's (``meta["original_affine"]``).

    Raises:
        ValueError: ``preprocessed[key]`` carries no transform trace, or the output shape does not match it.
    """
    ref = preprocessed.get(key)
    if not isinstance(ref, MetaTensor) or not ref.applied_operations:
        raise ValueError(f"preprocessed['{key}'] must be the MetaTensor produced by the transform (with its trace of "
                         "applied operations); got " + type(ref).__name__)
    out = output.detach() if isinstance(output, torch.Tensor) else torch.as_tensor(output)
    if out.ndim == ref.ndim + 1 and out.shape[0] == 1:
        out = out[0]
    if tuple(out.shape[1:]) != tuple(ref.shape[1:]) or out.ndim != ref.ndim:
        raise ValueError(f"model output shape {tuple(out.shape)} does not match the preprocessed '{key}' "
                         f"shape {tuple(ref.shape)} (channels may differ, spatial size may not)")
    out = out.as_tensor() if isinstance(out, MetaTensor) else out
    out_key = f"__{key}_output"
    inverter = Invertd(keys=out_key, transform=transform, orig_keys=key, nearest_interp=nearest_interp, to_tensor=True)
    restored = inverter({key: ref, out_key: MetaTensor(out.cpu())})[out_key]
    if not isinstance(restored, MetaTensor):
        restored = MetaTensor(restored, meta=dict(ref.meta))
    return restored
