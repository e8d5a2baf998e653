"""Image similarity between paired batches, 2D or 3D, whole image or inside/outside a region mask.

Every function takes ``x``, ``y`` of shape ``(B, C, H, W)`` or ``(B, C, H, W, D)`` (same shape) and an optional
``mask`` broadcastable to ``(B, 1, *spatial)`` (``(*spatial)``, ``(1, 1, *spatial)``, ``(B, 1, *spatial)`` or
``(B, C, *spatial)``; nonzero = in the region). ``region="inside"`` scores only masked voxels, ``"outside"`` only
the rest. ``reduction="none"`` returns the per-sample ``(B,)`` tensor, ``"mean"`` its NaN-ignoring mean as a float
(a sample whose region is empty scores NaN).

Unmasked SSIM / MS-SSIM / PSNR are MONAI's :class:`~monai.metrics.SSIMMetric`,
:class:`~monai.metrics.MultiScaleSSIMMetric`, :class:`~monai.metrics.PSNRMetric`. Masked variants use MONAI's
``compute_ssim_and_cs`` maps and average them over the region: the SSIM map is a *valid* convolution, so its voxel
``p`` is the window centred at ``p + (k-1)/2``; the mask is cropped by ``(k-1)/2`` on each side to match, i.e. a
window belongs to the region when its centre does.

Small images: SSIM's window shrinks to the largest odd size ``<= min(spatial)`` (at most 11). MS-SSIM with the
standard 5 scales and an 11-voxel window needs ``>= 176`` voxels per side; :func:`ms_ssim_config` picks the most
scales (then the largest window) that fit and renormalises the retained standard weights (Wang et al. 2003) to sum
to 1 (only when scales were dropped), e.g. 128² -> 4 scales, window 11; 64³ -> 3 scales, window 11; 16² -> 2 scales, window 7. The config used is
returned by :func:`similarity_metrics`; MS-SSIM values from different configs are not comparable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs

from ._checks import EvaluationError, check_pair, to_float

__all__ = [
    "MS_SSIM_WEIGHTS",
    "l1",
    "ssim",
    "ms_ssim",
    "psnr",
    "ssim_window",
    "ms_ssim_config",
    "similarity_metrics",
]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_SIGMA = 1.5


def _region(mask: torch.Tensor | None, x: torch.Tensor, region: str) -> torch.Tensor | None:
    """Bool mask of shape ``(B, 1 or C, *spatial)`` selecting the region, or None for the whole image."""
    if region not in ("inside", "outside", "all"):
        raise EvaluationError(f"region must be 'inside', 'outside' or 'all', got {region!r}")
    if mask is None or region == "all":
        if mask is None and region != "all" and region != "inside":
            raise EvaluationError(f"region={region!r} needs a mask")
        return None
    m = torch.as_tensor(mask, device=x.device)
    spatial = x.shape[2:]
    if tuple(m.shape) == tuple(spatial):
        m = m.reshape(1, 1, *spatial)
    if m.ndim != x.ndim or tuple(m.shape[2:]) != tuple(spatial) or m.shape[0] not in (1, x.shape[0]) or m.shape[1] not in (1, x.shape[1]):
        raise EvaluationError(
            f"mask {tuple(m.shape)} does not fit images {tuple(x.shape)}; use (*spatial), (1|B, 1|C, *spatial)"
        )
    m = m != 0
    m = m.expand(x.shape[0], m.shape[1], *spatial)
    return m if region == "inside" else ~m


def _masked_mean(v: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of ``v`` ``(B, C, *s)`` over ``m`` (broadcast over channels); NaN where the region is empty."""
    if m is None:
        return v.reshape(v.shape[0], -1).mean(1)
    m = m.expand_as(v).to(v.dtype)
    num = (v * m).reshape(v.shape[0], -1).sum(1)
    den = m.reshape(v.shape[0], -1).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))


def _reduce(per_sample: torch.Tensor, reduction: str):
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return to_float(torch.nanmean(per_sample)) if per_sample.numel() else None
    raise EvaluationError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _crop_to(m: torch.Tensor, shape: Sequence[int], k: Sequence[int]) -> torch.Tensor:
    sl = [slice(None), slice(None)] + [slice((ki - 1) // 2, (ki - 1) // 2 + s) for ki, s in zip(k, shape)]
    return m[tuple(sl)]


def l1(x: torch.Tensor, y: torch.Tensor, mask=None, region: str = "inside", reduction: str = "mean"):
    """Mean absolute difference per sample (over channels and region voxels)."""
    x, y = check_pair(x, y)
    return _reduce(_masked_mean((x - y).abs(), _region(mask, x, region)), reduction)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, mask=None, region: str = "inside", reduction: str = "mean"):
    """PSNR in dB, ``20·log10(data_range) - 10·log10(MSE)``; ``inf`` for identical images."""
    x, y = check_pair(x, y)
    m = _region(mask, x, region)
    if m is None:
        per = PSNRMetric(max_val=data_range, reduction="none")(x, y).reshape(-1)
    else:
        mse = _masked_mean((x - y) ** 2, m)
        per = 20 * math.log10(data_range) - 10 * torch.log10(mse)
    return _reduce(per, reduction)


def ssim_window(spatial_shape: Sequence[int], win_size: int = 11) -> int:
    """Largest odd window ``<= win_size`` that fits ``spatial_shape``."""
    k = min(int(win_size), min(int(s) for s in spatial_shape))
    k = k if k % 2 else k - 1
    if k < 3:
        raise EvaluationError(f"images {tuple(spatial_shape)} are too small for SSIM (need >= 3 voxels per side)")
    return k


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    mask=None,
    region: str = "inside",
    reduction: str = "mean",
):
    """SSIM with a Gaussian window (σ = 1.5), 2D or 3D from the tensor rank; window shrunk to fit small images."""
    x, y = check_pair(x, y)
    sd = x.ndim - 2
    k = ssim_window(x.shape[2:], win_size)
    m = _region(mask, x, region)
    if m is None:
        per = SSIMMetric(spatial_dims=sd, data_range=data_range, win_size=k, kernel_sigma=_SIGMA, reduction="none")(x, y)
        per = per.reshape(-1)
    else:
        smap, _ = compute_ssim_and_cs(x, y, sd, (k,) * sd, (_SIGMA,) * sd, data_range=data_range)
        per = _masked_mean(smap, _crop_to(m, smap.shape[2:], (k,) * sd))
    return _reduce(per, reduction)


def ms_ssim_config(
    spatial_shape: Sequence[int], kernel_size: int = 11, weights: Sequence[float] = MS_SSIM_WEIGHTS
) -> tuple[tuple[float, ...], int]:
    """``(weights, kernel_size)`` for MS-SSIM that fit ``spatial_shape``.

    Keeps the window and drops the coarsest scales first (down to 2 scales), then shrinks the window (odd, >= 3).
    A config fits when ``min(spatial) // max(2**(n-1), (n-1)**2) >= kernel`` (the coarsest scale holds a whole
    window, and MONAI's own size check passes). When scales are dropped, the retained weights are renormalised to
    sum to 1.

    Raises:
        EvaluationError: the image is too small even for 2 scales with a 3-voxel window (< 6 per side).
    """
    size = min(int(s) for s in spatial_shape)
    for k in range(int(kernel_size), 2, -1):
        if k % 2 == 0:
            continue
        for n in range(len(weights), 1, -1):
            if size // max(2 ** (n - 1), (n - 1) ** 2) >= k:
                if n == len(weights):
                    return tuple(float(v) for v in weights), k
                w = [float(v) for v in weights[:n]]
                total = sum(w)
                return tuple(v / total for v in w), k
    raise EvaluationError(f"images {tuple(spatial_shape)} are too small for MS-SSIM (need >= 6 voxels per side)")


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: int = 11,
    weights: Sequence[float] | None = None,
    mask=None,
    region: str = "inside",
    reduction: str = "mean",
):
    """Multi-scale SSIM; ``weights=None`` picks scales/window with :func:`ms_ssim_config` (explicit weights are used
    as given, with MONAI's size check)."""
    x, y = check_pair(x, y)
    sd = x.ndim - 2
    if weights is None:
        weights, kernel_size = ms_ssim_config(x.shape[2:], kernel_size)
    m = _region(mask, x, region)
    if m is None:
        metric = MultiScaleSSIMMetric(
            spatial_dims=sd, data_range=data_range, kernel_size=kernel_size, kernel_sigma=_SIGMA, weights=weights, reduction="none"
        )
        per = metric(x, y).reshape(-1)
        return _reduce(per, reduction)
    # masked: MONAI's algorithm (relu'd CS at each scale, SSIM at the coarsest), averaged over the region per scale
    k = (kernel_size,) * sd
    pool = getattr(F, f"avg_pool{sd}d")
    mf = m.float()
    levels = []
    for i in range(len(weights)):
        s, cs = compute_ssim_and_cs(x, y, sd, k, (_SIGMA,) * sd, data_range=data_range)
        mi = _crop_to(mf >= 0.5, s.shape[2:], k)
        levels.append(torch.relu(_masked_mean(s if i == len(weights) - 1 else cs, mi)))
        x, y, mf = pool(x, kernel_size=2), pool(y, kernel_size=2), pool(mf, kernel_size=2)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device).reshape(-1, 1)
    per = torch.prod(torch.stack(levels) ** w, dim=0)
    return _reduce(per, reduction)


def similarity_metrics(
    x: torch.Tensor,
    y: torch.Tensor,
    mask=None,
    data_range: float = 1.0,
    metrics: Sequence[str] = ("l1", "ssim", "ms_ssim", "psnr"),
    per_sample: bool = False,
) -> dict:
    """Several similarity metrics of ``x`` against reference ``y`` ``(B, C, *spatial)``, JSON-ready.

    Returns:
        ``{"all": {metric: mean}, "inside": {...}, "outside": {...}}`` (the last two only with a mask), plus
        ``"per_sample"`` lists when ``per_sample``, ``"ms_ssim_config"`` and ``"notes"`` (why a value is None).
    """
    x, y = check_pair(x, y)
    fns = {"l1": l1, "ssim": ssim, "ms_ssim": ms_ssim, "psnr": psnr}
    unknown = [m for m in metrics if m not in fns]
    if unknown:
        raise EvaluationError(f"unknown similarity metric(s) {unknown}; accepted: {sorted(fns)}")
    regions = ["all"] + (["inside", "outside"] if mask is not None else [])
    out: dict = {"notes": {}}
    if per_sample:
        out["per_sample"] = {}
    for name in metrics:
        if name == "ms_ssim":
            try:
                w, k = ms_ssim_config(x.shape[2:])
                out["ms_ssim_config"] = {"weights": list(w), "kernel_size": k, "scales": len(w)}
            except EvaluationError as e:
                out["notes"]["ms_ssim"] = f"not computed: {e}"
                for r in regions:
                    out.setdefault(r, {})["ms_ssim"] = None
                continue
    for r in regions:
        out.setdefault(r, {})
        for name in metrics:
            if name in out[r]:
                continue
            kwargs = {} if name == "l1" else {"data_range": data_range}
            vals = fns[name](x, y, mask=mask if r != "all" else None, region="inside" if r == "all" else r, reduction="none", **kwargs)
            finite = vals[torch.isfinite(vals)]
            if name == "psnr" and torch.isinf(vals).any():
                out["notes"]["psnr"] = "some samples are identical to the reference (PSNR = inf), excluded from the mean"
            out[r][name] = to_float(finite.mean()) if finite.numel() else None
            if out[r][name] is None and name not in out["notes"]:
                out["notes"][name] = f"no finite value in region '{r}' (empty region or identical images)"
            if per_sample:
                out["per_sample"].setdefault(r, {})[name] = [to_float(v) if math.isfinite(float(v)) else None for v in vals]
    return out
