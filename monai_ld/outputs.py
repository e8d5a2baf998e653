"""Writing a counterfactual's pictures: PNG copies of 2D results (the input's bit depth) and the summary figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .transforms.chains import RAS_LABELS
from .utils import atomic_write

__all__ = ["as_2d", "png_bits", "write_png", "write_native_png", "display_volume", "write_figure", "figure_title"]


def as_2d(t: Any) -> np.ndarray:
    """``(C, W, H)`` / ``(W, H)`` in MONAI's 2D convention (first axis = image columns) -> ``(H, W)`` image rows."""
    a = np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)
    while a.ndim > 2:
        a = a[0]
    return a.T


def png_bits(path: Path) -> int:
    """8 for an 8-bit image file (PNG/JPEG/BMP in L/RGB modes), else 16 (16-bit PNG, DICOM, NIfTI, ...)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return 8 if im.mode in ("1", "L", "LA", "P", "RGB", "RGBA") else 16
    except (UnidentifiedImageError, OSError):
        return 16


def write_png(a: np.ndarray, path: Path, value_range: tuple[float, float] | None, bits: int = 8) -> None:
    """Grayscale at ``bits`` (8 or 16) for images (``value_range``), RGB diverging colour map for a difference
    (symmetric range)."""
    from PIL import Image

    a = np.asarray(a, dtype=np.float32)
    if value_range is not None:
        lo, hi = value_range
        top, dtype = (65535, np.uint16) if bits == 16 else (255, np.uint8)
        img = Image.fromarray((np.clip((a - lo) / (hi - lo), 0, 1) * top).round().astype(dtype))
    else:
        import matplotlib

        m = float(np.abs(a).max()) or 1.0
        rgba = matplotlib.colormaps["RdBu_r"]((a / m + 1) / 2)
        img = Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8), mode="RGB")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def write_native_png(image: torch.Tensor, path: Path, stored_dtype: str) -> None:
    """A native-space 2D result ``(C, W, H)`` written losslessly with the input's own values and bit depth
    (``stored_dtype`` uint8 / uint16: gray, uint8 3-4 channels: RGB(A)), so unchanged pixels read back equal.
    Other types (a DICOM's int16, float) become a 16-bit picture of their range; the NIfTI copy holds the values."""
    from PIL import Image

    a = np.asarray(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image)
    if stored_dtype in ("uint8", "uint16"):
        a = a.astype(stored_dtype)
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.dtype == np.uint8:
        img = Image.fromarray(np.ascontiguousarray(np.moveaxis(a, 0, -1).transpose(1, 0, 2)))
    else:
        g = as_2d(a)
        if g.dtype not in (np.uint8, np.uint16):
            lo, hi = float(g.min()), float(g.max())
            g = ((g.astype(np.float64) - lo) / ((hi - lo) or 1.0) * 65535).round().astype(np.uint16)
        img = Image.fromarray(np.ascontiguousarray(g))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def display_volume(t: Any) -> np.ndarray:
    """A 3D input-space MetaTensor ``(C, X, Y, Z)`` reoriented to RAS for display, first channel, float32."""
    from monai.transforms import Orientation

    return np.asarray(Orientation(axcodes="RAS", labels=RAS_LABELS)(t)[0].float().cpu().numpy(), dtype=np.float32)


def _slices(vol: np.ndarray, center: Sequence[int] | None = None) -> list[tuple[str, np.ndarray]]:
    """Axial, coronal and sagittal slices through ``center`` (default: the middle) of a RAS ``(X, Y, Z)`` volume,
    oriented for display."""
    x, y, z = center if center is not None else (s // 2 for s in vol.shape)
    return [("axial", np.rot90(vol[:, :, z])), ("coronal", np.rot90(vol[:, y, :])), ("sagittal", np.rot90(vol[x, :, :]))]


def _fmt(attrs: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (attrs or {}).items()) or "null"


def figure_title(rec: Mapping[str, Any]) -> str:
    extra = f", mask={rec['mask_threshold']:g}" if rec.get("mask_threshold") is not None else ""
    if rec.get("samples", 1) > 1:
        extra += f", {rec['samples']} samples"
    return (f"source: {_fmt(rec['source'])}\ntarget: {_fmt(rec['target'])}\nδ={rec['drift']:g}, strength={rec['strength']:g}, "
            f"guidance_scale={rec['guidance_scale']}, composition={rec['composition']}, seed={rec['seed']}{extra}, "
            f"output space: {rec.get('output_space', 'model')}")


def write_figure(path: Path, panels: Sequence[tuple[str, np.ndarray, str, float, float]], spatial_dims: int, title: str,
                 region: np.ndarray | None = None) -> None:
    """One column per panel ``(title, array, cmap, vmin, vmax)`` (3D: axial/coronal/sagittal rows of RAS volumes
    through the centre of mass of the third panel's magnitude, the difference; 2D: one row of ``(W, H)`` arrays);
    ``region`` (same grid) is outlined on every panel but the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if spatial_dims == 3:
        center = None
        if len(panels) > 2 and np.abs(panels[2][1]).sum() > 0:  # where the edit is, not the middle of the field of view
            w = np.abs(panels[2][1])
            center = [int(round(float((w.sum(tuple(j for j in range(3) if j != i)) * np.arange(w.shape[i])).sum() / w.sum())))
                      for i in range(3)]
        cols = [_slices(a, center) for _, a, *_ in panels]
        outline = _slices(region.astype(np.float32), center) if region is not None else None
    else:
        cols = [[("", a.T)] for _, a, *_ in panels]
        outline = [("", region.astype(np.float32).T)] if region is not None else None
    rows = len(cols[0])
    fig, axes = plt.subplots(rows, len(panels), figsize=(3.2 * len(panels), 3.1 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for c, (name, _, cmap, vmin, vmax) in enumerate(panels):
        for r in range(rows):
            ax = axes[r, c]
            im = ax.imshow(cols[c][r][1], cmap=cmap, vmin=vmin, vmax=vmax)
            if outline is not None and c > 0 and outline[r][1].any() and not outline[r][1].all():
                ax.contour(outline[r][1], levels=[0.5], colors="gold", linewidths=0.6)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(cols[c][r][0])
        axes[0, c].set_title(name, fontsize=9)
        if cmap != "gray":
            fig.colorbar(im, ax=axes[:, c].tolist(), shrink=0.8, aspect=30)
    fig.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)
