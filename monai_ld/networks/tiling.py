"""Bounded memory for large volumes: sliding-window (tiled, overlapped) encoding and decoding of an autoencoder.

:class:`TiledAutoencoder` wraps an ``AutoencoderKL`` and exposes what the inferers call on it (``encode``,
``sampling``, ``decode``, ``encode_stage_2_inputs``, ``decode_stage_2_outputs``, ``reconstruct``, ``forward``). Up to
``threshold`` image voxels per item it *is* the wrapped autoencoder (same call, bit-identical output); above it runs
MONAI's :class:`~monai.inferers.SlidingWindowInferer` (gaussian blending) over windows of ``window`` image voxels, so
peak memory follows the window, not the volume (as MAISI decodes its latents):

- encoding: windows of the image ``(B, C, *S)``, each encoded to a latent tile at ``1/f`` scale (``f`` = the
  autoencoder's downsampling factor; the inferer stitches outputs at another scale). Window starts stay on multiples of
  ``f`` so every tile samples the image in the same phase as the whole-volume encoder;
- decoding: windows of ``window / f`` latent voxels of ``(B, C_lat, *S/f)``, each decoded to an image tile at ``f``
  scale.

The window matters beyond memory: GroupNorm normalises over the window, so an autoencoder trained on patches decodes
best on windows of its training patch, one trained on whole volumes best whole. :func:`trained_window` reads it from
the checkpoint (the autoencoder's training record) and :func:`tile_autoencoder` wraps a loaded ``ConditionalLDM``.

The wrapper's ``state_dict`` has the wrapped network's own keys, so a checkpoint saved from a wrapped model is the same
file as an unwrapped one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

__all__ = ["DEFAULT_TILE_THRESHOLD", "DEFAULT_OVERLAP", "TiledAutoencoder", "downsample_factor", "tile_autoencoder",
           "trained_window"]

# image voxels per batch item above which the autoencoder runs in windows: a 128³ grid decoded whole by the brain
# bundle's autoencoder (channels 32/64/64) peaks around 1.5 GB; a 1 mm head (182×218×182, 7.2 M voxels) is tiled
DEFAULT_TILE_THRESHOLD = 128**3
DEFAULT_OVERLAP = 0.25
MAX_SW_BATCH = 8  # windows per network call: bounded by the threshold's memory, and no faster beyond a few on CPU


def downsample_factor(autoencoder: nn.Module) -> int:
    """Image size / latent size per spatial dimension (``2 ** number of downsampling blocks``)."""
    n = sum(type(m).__name__.endswith("Downsample") for m in autoencoder.modules())
    if n == 0 and hasattr(getattr(autoencoder, "encoder", None), "channels"):
        n = len(autoencoder.encoder.channels) - 1
    return 2**n


def _aligned_overlap(roi: int, overlap: float, unit: int) -> float:
    """The overlap whose scan interval (``int(roi * (1 - overlap))`` in MONAI) is a multiple of ``unit``."""
    step = max(unit, int(roi * (1.0 - overlap)) // unit * unit)
    return 0.0 if step >= roi else 1.0 - (step + 0.5) / roi  # +0.5: int() of the product is exactly ``step``


class TiledAutoencoder(nn.Module):
    """``autoencoder`` whole up to ``threshold`` image voxels per item, in overlapping windows above.

    Args:
        autoencoder: an ``AutoencoderKL`` (or a network with ``encode -> (mu, sigma)``, ``sampling``, ``decode``).
        window: window size in image voxels (one int or one per spatial dim; multiples of the downsampling factor);
            ``None``: never tile.
        threshold: tile when an item's image-space voxel count exceeds this (``0``: whenever the window is smaller than
            the volume; ``math.inf``: never).
        overlap: fraction of a window shared with its neighbour (rounded so windows stay on the latent grid).
        mode / sigma_scale: blending of overlapping windows (MONAI ``BlendMode``; gaussian weights the window centre).
        sw_batch_size: windows per network call (``None``: as many as ``threshold`` voxels hold, at most 8).

    ``windows`` counts the windows the last call ran (``0``: it ran whole).
    Shapes: images ``(B, C, *S)``, latents ``(B, C_lat, *S/f)``.
    """

    def __init__(self, autoencoder: nn.Module, window: int | Sequence[int] | None, threshold: float = DEFAULT_TILE_THRESHOLD,
                 overlap: float = DEFAULT_OVERLAP, mode: str = "gaussian", sigma_scale: float = 0.125,
                 sw_batch_size: int | None = None) -> None:
        super().__init__()
        self.ae = autoencoder
        self.factor = downsample_factor(autoencoder)
        self.threshold = float(threshold)
        self.overlap, self.mode, self.sigma_scale = float(overlap), str(mode), float(sigma_scale)
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.window: tuple[int, ...] | None = None
        if window is not None:
            w = (int(window),) if isinstance(window, int) else tuple(int(v) for v in window)
            if any(v < self.factor or v % self.factor for v in w):
                raise ValueError(f"window {w} must be multiples of the autoencoder's downsampling factor {self.factor}")
            self.window = w
        self.sw_batch_size = sw_batch_size
        self.windows = 0
        # the wrapped network's keys, without the "ae." level: a saved model is the same file wrapped or not
        self._register_state_dict_hook(_strip_prefix)
        self._register_load_state_dict_pre_hook(_add_prefix)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "ae":
                raise
            return getattr(self.ae, name)  # anything else the autoencoder has (encoder, decoder, latent_channels, ...)

    # -- when and how ---------------------------------------------------------------------------------------------
    def _window(self, image_shape: Sequence[int]) -> tuple[int, ...] | None:
        """The image-space window for an item of ``image_shape``, or ``None`` to run whole."""
        if self.window is None or math.prod(image_shape) <= self.threshold:
            return None
        w = self.window * len(image_shape) if len(self.window) == 1 else self.window
        if len(w) != len(image_shape):
            raise ValueError(f"window {self.window} does not match a {len(image_shape)}D input")
        w = tuple(min(a, s) for a, s in zip(w, image_shape))  # never pad: a padded border would shift the latent grid
        return None if w == tuple(image_shape) else w

    def _inferer(self, roi: Sequence[int], unit: int, image_window: Sequence[int]) -> SlidingWindowInferer:
        n = self.sw_batch_size or max(1, min(MAX_SW_BATCH, int(self.threshold // max(1, math.prod(image_window)))))
        return SlidingWindowInferer(roi_size=list(roi), sw_batch_size=n, mode=self.mode, sigma_scale=self.sigma_scale,
                                    overlap=[_aligned_overlap(r, self.overlap, unit) for r in roi])

    def _counted(self, fn):
        def run(x: torch.Tensor, *args: Any, **kwargs: Any):
            self.windows += x.shape[0]
            return fn(x, *args, **kwargs)

        return run

    # -- the autoencoder's interface ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, *S)`` -> posterior ``(mu, sigma)``, each ``(B, C_lat, *S/f)``."""
        self.windows = 0
        w = self._window(x.shape[2:])
        if w is None:
            return self.ae.encode(x)
        mu, sigma = self._inferer(w, self.factor, w)(x, self._counted(self.ae.encode))
        return mu, sigma

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        return self.ae.sampling(z_mu, z_sigma)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, C_lat, *s)`` -> ``(B, C_out, *s·f)``."""
        self.windows = 0
        w = self._window([s * self.factor for s in z.shape[2:]])
        if w is None:
            return self.ae.decode(z)
        return self._inferer([v // self.factor for v in w], 1, w)(z, self._counted(self.ae.decode))

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.sampling(*self.encode(x))

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, sigma = self.encode(x)
        return self.decode(self.sampling(mu, sigma)), mu, sigma

    def extra_repr(self) -> str:
        return f"window={self.window}, threshold={self.threshold:g}, overlap={self.overlap}, factor={self.factor}"


def _strip_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "ae.")]:
        state_dict[prefix + k[len(prefix) + 3:]] = state_dict.pop(k)


def _add_prefix(state_dict: dict, prefix: str, *args: Any) -> None:
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "ae.")]:
        state_dict[prefix + "ae." + k[len(prefix):]] = state_dict.pop(k)


# -- from a checkpoint ------------------------------------------------------------------------------------------------
def _same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def trained_window(model: Any, checkpoint: str | os.PathLike | None = None) -> tuple[tuple[int, ...] | None, str]:
    """The window the model's autoencoder was trained on, and where that was read.

    In order: ``meta["tiling"]["window"]`` (set by hand), ``meta["autoencoder_record"]["patch_size"]``, the record of
    the ``autoencoder.pt`` beside ``checkpoint`` when its weights are the model's (``patch_size``; ``None`` there
    means whole volumes), else the model grid ``meta["preprocessing"]["spatial_size"]`` (trained whole).
    """
    meta = getattr(model, "meta", {}) or {}
    if (meta.get("tiling") or {}).get("window"):
        return tuple(meta["tiling"]["window"]), "meta tiling.window"
    if (meta.get("autoencoder_record") or {}).get("patch_size"):
        return tuple(meta["autoencoder_record"]["patch_size"]), "meta autoencoder_record.patch_size"
    grid = (meta.get("preprocessing") or {}).get("spatial_size")
    grid = tuple(int(v) for v in grid) if grid else None
    sibling = Path(checkpoint).with_name("autoencoder.pt") if checkpoint is not None else None
    if sibling is not None and sibling.is_file() and sibling != Path(checkpoint):
        try:
            ckpt = torch.load(sibling, map_location="cpu", weights_only=True)
            record = ckpt.get("record") or {}
            if "patch_size" in record and _same_weights(ckpt["state_dict"], model.autoencoder.state_dict()):
                patch = record["patch_size"]
                return (tuple(patch), f"{sibling.name} record.patch_size") if patch else (grid, f"{sibling.name}: whole volumes")
        except Exception:  # noqa: BLE001 - an unreadable sibling only means no record: fall back to the grid
            pass
    return grid, "the model grid (no training patch recorded)"


def tile_autoencoder(model: Any, checkpoint: str | os.PathLike | None = None, threshold: float | None = None,
                     window: int | Sequence[int] | None = None, **kwargs: Any) -> TiledAutoencoder:
    """Wrap ``model.autoencoder`` (a loaded ``ConditionalLDM``) in place; returns the wrapper (idempotent).

    ``window`` / ``threshold`` ``None``: :func:`trained_window` / :data:`DEFAULT_TILE_THRESHOLD`."""
    ae = model.autoencoder
    if isinstance(ae, TiledAutoencoder):
        ae = ae.ae
    source = "given"
    if window is None:
        window, source = trained_window(model, checkpoint)
    tiled = TiledAutoencoder(ae, window, DEFAULT_TILE_THRESHOLD if threshold is None else threshold, **kwargs)
    tiled.window_source = source
    model.autoencoder = tiled
    return tiled
