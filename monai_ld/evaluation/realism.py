"""Realism: distances between a set of real and a set of generated samples.

All feature-space metrics take ``(N, F)`` feature matrices from the SAME feature network (see
:mod:`monai_ld.evaluation.oracle` for the offline one, ``"oracle-penultimate"``; any ``Callable[[Tensor], Tensor]``
returning ``(B, F)`` works too). No Inception / RadImageNet weights exist offline, so FID/KID values here are NOT
comparable with published Inception-FID numbers; :func:`realism_metrics` records which network produced them.

- :func:`fid` — Fréchet distance, via MONAI's :class:`~monai.metrics.FIDMetric`.
- :func:`kid` — Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel
  ``k(x, y) = (x·y / F + 1)³``, averaged over random subsets; MONAI has no KID.
- :func:`mmd` — unbiased MMD² on FEATURES with a Gaussian (RBF) kernel, bandwidth by the median heuristic. We use a
  Gaussian kernel here because MONAI's :class:`~monai.metrics.MMDMetric` is a *linear*-kernel MMD (it only compares
  the means of the two sets, i.e. ``||mean(x) - mean(y)||²`` unbiasedly estimated), which on features is blind to
  differences in spread/shape; the RBF kernel is characteristic (MMD = 0 iff the distributions are equal).
- :func:`image_mmd` — MONAI's ``MMDMetric`` on images directly (as in MONAI's generative tutorials).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from monai.metrics import FIDMetric, MMDMetric

from ._checks import EvaluationError, check_feature_sets, check_pair, to_float

__all__ = ["fid", "kid", "mmd", "image_mmd", "gaussian_kernel_bandwidth", "realism_metrics"]


def fid(real_feats: torch.Tensor, fake_feats: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (MONAI ``FIDMetric``).

    Args:
        real_feats: ``(N, F)`` features of real images, ``N >= 2``.
        fake_feats: ``(M, F)`` features of generated images, ``M >= 2``.

    Returns:
        FID (float, >= 0 up to round-off). With fewer samples than features the covariances are singular and the
        estimate is biased upward; a warning says so.
    """
    real, fake = check_feature_sets(real_feats, fake_feats, min_samples=2)
    if min(real.shape[0], fake.shape[0]) <= real.shape[1]:
        warnings.warn(
            f"FID with {real.shape[0]}/{fake.shape[0]} samples and {real.shape[1]} features: covariances are rank "
            "deficient, the value is biased; use more samples or fewer features",
            stacklevel=2,
        )
    with warnings.catch_warnings():
        # MONAI passes scipy's deprecated ``disp`` to sqrtm (harmless with scipy < 1.18, our pin)
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
        value = FIDMetric()(fake, real)
    return float(value.real if torch.is_complex(value) else value)


def _poly_kernel(a: torch.Tensor, b: torch.Tensor, degree: int, gamma: float, coef0: float) -> torch.Tensor:
    return (gamma * a @ b.T + coef0) ** degree


def _unbiased_mmd2(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    m, n = kxx.shape[0], kyy.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sxx + syy - 2.0 * kxy.mean()


def kid(
    real_feats: torch.Tensor,
    fake_feats: torch.Tensor,
    subsets: int = 100,
    subset_size: int | None = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased polynomial-kernel MMD², mean and std over random subsets.

    Args:
        real_feats: ``(N, F)`` real features.
        fake_feats: ``(M, F)`` generated features.
        subsets: number of random subsets.
        subset_size: samples per subset drawn without replacement from each set; ``None`` or larger than the sets
            means ``min(N, M)`` (a warning is issued when shrunk from an explicit value).
        degree, gamma, coef0: kernel ``(gamma·x·y + coef0)^degree``; ``gamma=None`` is ``1/F`` (standard KID).
        seed: seeds the subset sampling (deterministic result).

    Returns:
        ``(kid_mean, kid_std)``. Identical sets give ≈ 0 (the unbiased estimate can be slightly negative).
    """
    real, fake = check_feature_sets(real_feats, fake_feats, min_samples=2)
    if subsets < 1:
        raise EvaluationError(f"kid: subsets must be >= 1, got {subsets}")
    n_max = min(real.shape[0], fake.shape[0])
    if subset_size is None:
        subset_size = n_max
    elif subset_size > n_max:
        warnings.warn(f"kid: subset_size {subset_size} > smallest set ({n_max}); using {n_max}", stacklevel=2)
        subset_size = n_max
    if subset_size < 2:
        raise EvaluationError(f"kid: subset_size must be >= 2, got {subset_size}")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(real.shape[0], generator=g)[:subset_size]]
        y = fake[torch.randperm(fake.shape[0], generator=g)[:subset_size]]
        values.append(
            _unbiased_mmd2(
                _poly_kernel(x, x, degree, gamma, coef0), _poly_kernel(y, y, degree, gamma, coef0), _poly_kernel(x, y, degree, gamma, coef0)
            )
        )
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=True)) if len(values) > 1 else 0.0


def gaussian_kernel_bandwidth(real_feats: torch.Tensor, fake_feats: torch.Tensor) -> float:
    """Median heuristic: the median pairwise Euclidean distance over the pooled ``(N+M, F)`` sample."""
    real, fake = check_feature_sets(real_feats, fake_feats, min_samples=1)
    z = torch.cat([real, fake])
    d = torch.cdist(z, z)
    off = d[~torch.eye(z.shape[0], dtype=torch.bool)]
    med = float(off.median()) if off.numel() else 0.0
    return med if med > 0 else 1.0


def mmd(
    real_feats: torch.Tensor, fake_feats: torch.Tensor, bandwidth: float | Sequence[float] | None = None
) -> float:
    """Unbiased MMD² between two feature sets with a Gaussian kernel ``exp(-||x-y||² / (2σ²))``.

    Args:
        real_feats: ``(N, F)``, ``N >= 2``.
        fake_feats: ``(M, F)``, ``M >= 2``.
        bandwidth: σ, or several σ (their kernels summed, a multi-scale kernel); ``None``: median heuristic on the
            pooled sample (:func:`gaussian_kernel_bandwidth`). Pass a fixed σ to compare values across runs.

    Returns:
        MMD² (float); ≈ 0 for samples from the same distribution (can be slightly negative: unbiased estimator).
    """
    real, fake = check_feature_sets(real_feats, fake_feats, min_samples=2)
    if bandwidth is None:
        sigmas = [gaussian_kernel_bandwidth(real, fake)]
    else:
        sigmas = [float(bandwidth)] if isinstance(bandwidth, (int, float)) else [float(s) for s in bandwidth]
    if not sigmas or any(not math.isfinite(s) or s <= 0 for s in sigmas):
        raise EvaluationError(f"mmd: bandwidth must be positive, got {bandwidth}")

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in sigmas)

    return float(_unbiased_mmd2(k(real, real), k(fake, fake), k(real, fake)))


def image_mmd(real_images: torch.Tensor, fake_images: torch.Tensor, y_mapping: Callable | None = None) -> float:
    """MONAI's ``MMDMetric`` (linear kernel, unbiased) directly on images.

    Args:
        real_images: ``(B, C, *spatial)``, ``B >= 2``.
        fake_images: same shape as ``real_images`` (MONAI requires equal set sizes).
        y_mapping: optional callable applied to both batches first (e.g. a Gaussian filter).
    """
    real, fake = check_pair(real_images, fake_images, ("real images", "fake images"))
    if real.shape[0] < 2:
        raise EvaluationError("image_mmd needs at least 2 images per set")
    return float(MMDMetric(y_mapping=y_mapping)(real, fake))


def realism_metrics(
    real_feats: torch.Tensor,
    fake_feats: torch.Tensor,
    feature_network: str,
    kid_subsets: int = 100,
    kid_subset_size: int | None = 1000,
    seed: int = 0,
) -> dict:
    """FID, KID (mean, std) and Gaussian MMD² on one pair of feature sets, JSON-ready.

    Args:
        real_feats, fake_feats: ``(N, F)`` / ``(M, F)``.
        feature_network: name recorded with the numbers, e.g. ``"oracle-penultimate"``; values are only comparable
            between runs that used the same network and weights.

    Returns:
        ``{"feature_network", "n_real", "n_fake", "feature_dim", "fid", "kid_mean", "kid_std", "mmd_rbf", "notes"}``;
        a metric that cannot be computed is ``None`` with the reason in ``notes``.
    """
    real, fake = check_feature_sets(real_feats, fake_feats, min_samples=2)
    out: dict = {
        "feature_network": feature_network,
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
        "feature_dim": int(real.shape[1]),
        "notes": {},
    }
    for key, fn in (
        ("fid", lambda: fid(real, fake)),
        ("kid", lambda: kid(real, fake, kid_subsets, kid_subset_size, seed=seed)),
        ("mmd_rbf", lambda: mmd(real, fake)),
    ):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = fn()
            for w in caught:
                out["notes"].setdefault(key, str(w.message))
        except (EvaluationError, ValueError) as e:  # e.g. imaginary sqrtm component
            value = None
            out["notes"][key] = f"not computed: {e}"
        if key == "kid":
            out["kid_mean"], out["kid_std"] = (None, None) if value is None else (to_float(value[0]), to_float(value[1]))
        else:
            out[key] = None if value is None else to_float(value)
    return out
