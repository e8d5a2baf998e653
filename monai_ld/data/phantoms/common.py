"""Shared helpers of the phantom generators: assets, identity seeding, smooth random fields, warping.

Everything here is deterministic given its inputs; no function touches a global random state.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

__all__ = [
    "ASSET_DIR",
    "load_asset",
    "stable_seed",
    "identity_rng",
    "smooth_noise",
    "sample_volume",
    "sample_image",
    "blurred_gradient_field",
]

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"


@functools.lru_cache(maxsize=None)
def load_asset(name: str) -> dict[str, np.ndarray]:
    """Load ``monai_ld/data/assets/<name>`` (an npz) once per process; arrays are read-only."""
    path = ASSET_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"phantom asset {path} is missing; regenerate it with scripts/make_phantom_assets.py")
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    for v in out.values():
        v.setflags(write=False)
    return out


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes and platforms, unlike ``hash``)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def identity_rng(seed: int, *stream) -> np.random.Generator:
    """The random stream ``stream`` (e.g. ``"noise"``) of the identity with seed ``seed``.

    Each use of randomness inside a render draws from its own named stream, so that rendering the same identity
    with different attributes reproduces every identity-dependent quantity exactly.
    """
    return np.random.default_rng(stable_seed(seed, *stream))


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], coarse: int | Sequence[int], channels: int = 1) -> np.ndarray:
    """Smooth zero-mean random field(s) of ``shape``: Gaussian noise on a ``coarse`` control grid, cubic upsampling.

    Returns ``(channels, *shape)`` float32 with unit standard deviation at the control points.
    """
    coarse = (coarse,) * len(shape) if np.isscalar(coarse) else tuple(coarse)
    ctrl = rng.standard_normal((channels, *coarse)).astype(np.float32)
    t = torch.from_numpy(ctrl)[None]
    mode = "bicubic" if len(shape) == 2 else "trilinear"
    up = F.interpolate(t, size=tuple(int(s) for s in shape), mode=mode, align_corners=True)[0]
    return up.numpy()


def _to_grid(vox: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates ``(..., ndim)`` (array-axis order) -> ``grid_sample`` grid (reversed, normalised)."""
    scale = torch.tensor([2.0 / (s - 1) for s in in_shape], dtype=vox.dtype)
    return (vox * scale - 1.0).flip(-1)


def sample_volume(vol: torch.Tensor, vox: torch.Tensor, mode: str = "bilinear", padding: str = "zeros") -> torch.Tensor:
    """Sample ``vol`` ``(C, D, H, W)`` at voxel coordinates ``vox`` ``(*S, 3)`` -> ``(C, *S)`` (trilinear by default)."""
    out_shape = vox.shape[:-1]
    grid = _to_grid(vox.reshape(1, -1, 1, 1, 3), vol.shape[1:])
    out = F.grid_sample(vol[None], grid, mode=mode, padding_mode=padding, align_corners=True)
    return out.reshape(vol.shape[0], *out_shape)


def sample_image(img: torch.Tensor, pix: torch.Tensor, mode: str = "bilinear", padding: str = "zeros") -> torch.Tensor:
    """2D counterpart of :func:`sample_volume`: ``img`` ``(C, H, W)``, ``pix`` ``(*S, 2)`` -> ``(C, *S)``."""
    out_shape = pix.shape[:-1]
    grid = _to_grid(pix.reshape(1, -1, 1, 2), img.shape[1:])
    out = F.grid_sample(img[None], grid, mode=mode, padding_mode=padding, align_corners=True)
    return out.reshape(img.shape[0], *out_shape)


def blurred_gradient_field(mask: np.ndarray, sigma_mm: float, spacing_mm: float, weight: np.ndarray | None = None, cutoff: float = 1e-3) -> np.ndarray:
    """Unit "boundary velocity" of a structure: ``-grad(G_sigma * mask)`` scaled so that a flat boundary moves 1 mm.

    The field points away from the structure (outwards), is smooth, vanishes on the structure's medial axis and
    decays like a Gaussian away from the boundary; values below ``cutoff`` (mm) are set to exactly zero so that a
    deformation made from it leaves far-away voxels bit-identical. Returns ``(3, *mask.shape)`` float32, in mm
    per unit amount, array-axis order.
    """
    b = ndi.gaussian_filter(mask.astype(np.float32), sigma_mm / spacing_mm)
    g = np.stack(np.gradient(b, spacing_mm), axis=0)  # per mm
    g *= -sigma_mm * np.sqrt(2.0 * np.pi)  # flat boundary: |grad| = 1 / (sigma sqrt(2 pi))
    if weight is not None:
        g *= weight[None]
    g[:, np.linalg.norm(g, axis=0) < cutoff] = 0.0
    return g.astype(np.float32)
