"""Grid search for the Latent Drifting shift δ.

The generator is a plain callable ``generate(drift: float) -> images (B, C, *spatial)``; make it deterministic
(same seed / noise for every δ) so the curve shows the effect of δ, not sampling noise.

Two objectives (DESIGN.md):

(a) :func:`search_drift_distribution` — a distribution distance between generated and real samples: ``"l1_mean"``
    (L1 between the mean generated image and the mean real image — the paper's Monte-Carlo L1; needs equal image
    shapes), or ``"mmd"`` / ``"fid"`` / ``"kid"`` on features of a feature network, or any callable.
(b) :func:`search_drift_counterfactual` — ``λ·ℓ_o(f(x'), y') + ℓ_in(x, x')`` with an oracle ``f``:
    ``ℓ_o`` = cross-entropy / log(K) for categorical targets (1 = chance level), |f(x') - y'| on the [0, 1]
    normalised scale for continuous ones, averaged over the target attributes and samples; ``ℓ_in`` = mean L1 or
    ``1 - SSIM`` between input and counterfactual.

Both return ``{"best_drift", "best_objective", "objective", "curve": [{"drift", "objective", ...components}],
"notes"}``. Ties go to the δ of smallest magnitude (the least intervention); non-finite objectives are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..conditioning import AttributeEncoder, ContinuousAttribute
from ._checks import EvaluationError, check_images, check_pair, to_float
from .oracle import AttributeOracle, FeatureExtractor, attribute_targets, extract_features
from .realism import fid, kid, mmd
from .similarity import ssim as _ssim

__all__ = ["drift_grid", "parse_drifts", "search_drift", "search_drift_distribution", "search_drift_counterfactual", "mean_image_l1", "oracle_loss"]


def drift_grid(start: float = -0.2, stop: float = 0.2, step: float = 0.05, decimals: int = 10) -> list[float]:
    """Inclusive grid ``start, start+step, ..., stop`` as floats rounded to ``decimals`` (no 0.15000000000000002)."""
    if step <= 0 or stop < start:
        raise EvaluationError(f"drift grid needs step > 0 and stop >= start, got {start}, {stop}, {step}")
    n = int(math.floor((stop - start) / step + 1e-9))
    return [round(start + i * step, decimals) + 0.0 for i in range(n + 1)]


def parse_drifts(value: Any) -> list:
    """``[0, "searched"]`` / ``"0,searched"`` / ``"-0.2:0.2:0.05"`` (inclusive grid) -> list of floats and ``"searched"``."""
    if value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str):
        s = value.strip()
        if s.count(":") == 2 and "," not in s:
            a, b, c = (float(v) for v in s.split(":"))
            return drift_grid(a, b, c)
        value = [v for v in s.replace(" ", "").split(",") if v]
    out: list = []
    for v in value:
        if isinstance(v, str) and v.strip().lower() in ("searched", "best"):
            out.append("searched")
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise EvaluationError(f"drift values are numbers or 'searched', got {v!r}") from None
        if not math.isfinite(f) or not -1.0 <= f <= 1.0:
            raise EvaluationError(f"drift values must be in [-1, 1], got {v!r}")
        out.append(f)
    if not out:
        raise EvaluationError(f"no drift values in {value!r}")
    return out


def search_drift(
    generate: Callable[[float], torch.Tensor],
    objective: Callable[[torch.Tensor], float | Mapping[str, float]],
    drifts: Sequence[float] | None = None,
) -> dict:
    """Evaluate ``objective(generate(δ))`` over the grid; the smallest objective wins.

    Args:
        generate: ``δ -> (B, C, *spatial)`` images.
        objective: images -> a float, or a dict with key ``"objective"`` plus any components to record.
        drifts: grid (default :func:`drift_grid`).
    """
    drifts = drift_grid() if drifts is None else [float(d) for d in drifts]
    if not drifts:
        raise EvaluationError("search_drift: empty drift grid")
    curve, notes = [], {}
    for d in drifts:
        with torch.no_grad():
            images = check_images(generate(d), f"generate({d})")
        value = objective(images)
        entry = {"drift": d}
        if isinstance(value, Mapping):
            if "objective" not in value:
                raise EvaluationError("an objective returning a dict must include the key 'objective'")
            entry.update({k: to_float(v) if isinstance(v, (int, float, torch.Tensor)) else v for k, v in value.items()})
        else:
            entry["objective"] = to_float(value)
        if entry["objective"] is None or not math.isfinite(entry["objective"]):
            notes[str(d)] = "objective not finite; excluded from the choice"
            entry["objective"] = None
        curve.append(entry)
    valid = [e for e in curve if e["objective"] is not None]
    if not valid:
        raise EvaluationError("search_drift: no drift gave a finite objective")
    best = min(valid, key=lambda e: (e["objective"], abs(e["drift"])))
    return {"best_drift": best["drift"], "best_objective": best["objective"], "curve": curve, "notes": notes}


def mean_image_l1(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean over voxels of |mean generated image - mean real image| (set sizes may differ, image shapes not)."""
    generated, real = check_images(generated, "generated"), check_images(real, "real")
    if generated.shape[1:] != real.shape[1:]:
        raise EvaluationError(f"generated {tuple(generated.shape)} and real {tuple(real.shape)} images differ in shape")
    return float((generated.double().mean(0) - real.double().mean(0)).abs().mean())


def search_drift_distribution(
    generate: Callable[[float], torch.Tensor],
    real_images: torch.Tensor,
    drifts: Sequence[float] | None = None,
    distance: str | Callable[[torch.Tensor, torch.Tensor], float] = "l1_mean",
    feature_fn: FeatureExtractor | AttributeOracle | None = None,
    kid_subset_size: int | None = None,
) -> dict:
    """Objective (a): distance between ``generate(δ)`` and ``real_images`` ``(N, C, *spatial)``.

    Args:
        distance: ``"l1_mean"`` (:func:`mean_image_l1`, the paper's choice), ``"mmd"`` (Gaussian-kernel MMD²),
            ``"fid"``, ``"kid"`` (the last three on ``feature_fn`` features; the MMD bandwidth is fixed once from
            the real features, so values are comparable across δ), or a callable ``(generated, real) -> float``.
        feature_fn: an :class:`AttributeOracle` or ``(B, C, *s) -> (B, F)`` callable, required for feature metrics.
    """
    real_images = check_images(real_images, "real images")
    name = distance if isinstance(distance, str) else getattr(distance, "__name__", "callable")
    if callable(distance):
        fn = lambda g: distance(g, real_images)  # noqa: E731
    elif distance == "l1_mean":
        fn = lambda g: mean_image_l1(g, real_images)  # noqa: E731
    elif distance in ("mmd", "fid", "kid"):
        if feature_fn is None:
            raise EvaluationError(f"distance={distance!r} needs a feature_fn (e.g. a trained AttributeOracle)")
        real_f = extract_features(feature_fn, real_images)
        if distance == "mmd":
            from .realism import gaussian_kernel_bandwidth

            sigma = gaussian_kernel_bandwidth(real_f, real_f)
            fn = lambda g: mmd(real_f, extract_features(feature_fn, g), bandwidth=sigma)  # noqa: E731
        elif distance == "fid":
            fn = lambda g: fid(real_f, extract_features(feature_fn, g))  # noqa: E731
        else:
            fn = lambda g: kid(real_f, extract_features(feature_fn, g), subsets=50, subset_size=kid_subset_size)[0]  # noqa: E731
    else:
        raise EvaluationError(f"distance must be 'l1_mean', 'mmd', 'fid', 'kid' or a callable, got {distance!r}")
    result = search_drift(generate, fn, drifts)
    result["objective"] = name
    if distance in ("mmd", "fid", "kid"):
        result["feature_network"] = "oracle-penultimate" if isinstance(feature_fn, AttributeOracle) else getattr(feature_fn, "__name__", "user")
    return result


def oracle_loss(
    predicted: Mapping[str, torch.Tensor], target_rows: Sequence[Mapping], encoder: AttributeEncoder
) -> dict[str, float]:
    """Normalised oracle loss per target attribute (see module doc) from ``predict_normalised``-style outputs."""
    targets = attribute_targets(target_rows, encoder)
    out = {}
    for a in encoder.attributes:
        vals, known = targets[a.name]
        if not known.any():
            continue
        if a.name not in predicted:
            raise EvaluationError(f"oracle gave no prediction for target attribute {a.name!r}")
        p = predicted[a.name]
        if isinstance(a, ContinuousAttribute):
            out[a.name] = float((p.double().reshape(-1)[known] - vals[known].double()).abs().mean())
        else:
            prob = p.double()[known].clamp_min(1e-12)
            ce = -prob.gather(1, vals[known].view(-1, 1)).log().mean()
            out[a.name] = float(ce / math.log(a.width))
    if not out:
        raise EvaluationError("target rows set no attribute")
    return out


def search_drift_counterfactual(
    generate: Callable[[float], torch.Tensor],
    images: torch.Tensor,
    target_rows: Sequence[Mapping],
    oracle: AttributeOracle | Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    encoder: AttributeEncoder | Sequence[Mapping] | None = None,
    drifts: Sequence[float] | None = None,
    lam: float = 1.0,
    proximity: str = "l1",
    data_range: float = 1.0,
) -> dict:
    """Objective (b): ``λ·ℓ_o(f(x'), y') + ℓ_in(x, x')`` for counterfactuals ``x' = generate(δ)`` of ``images``.

    Args:
        generate: ``δ -> (B, C, *spatial)`` counterfactuals of ``images`` towards ``target_rows``.
        images: ``(B, C, *spatial)`` the factual inputs ``x``.
        target_rows: ``B`` dicts of intended target values ``y'`` (partial: only the listed attributes count).
        oracle: an :class:`AttributeOracle`, or a callable ``images -> {name: (B,) normalised value | (B, K) probs}``
            (the contract of :meth:`AttributeOracle.predict_normalised`).
        encoder: attribute specs (default: the oracle's).
        lam: λ.
        proximity: ``"l1"`` (mean |x - x'|) or ``"ssim"`` (``1 - SSIM``).
    """
    images = check_images(images, "images")
    if len(target_rows) != images.shape[0]:
        raise EvaluationError(f"{images.shape[0]} images but {len(target_rows)} target rows")
    if isinstance(oracle, AttributeOracle):
        encoder = encoder or oracle.encoder
        predict = oracle.predict_normalised
    else:
        predict = oracle
    if encoder is None:
        raise EvaluationError("pass the AttributeEncoder when the oracle is a plain callable")
    encoder = encoder if isinstance(encoder, AttributeEncoder) else AttributeEncoder(encoder)
    if proximity not in ("l1", "ssim"):
        raise EvaluationError(f"proximity must be 'l1' or 'ssim', got {proximity!r}")

    def objective(cf: torch.Tensor) -> dict:
        cf, x = check_pair(cf, images, ("counterfactuals", "images"))
        per_attr = oracle_loss(predict(cf), target_rows, encoder)
        lo = sum(per_attr.values()) / len(per_attr)
        lin = float((cf - x).abs().mean()) if proximity == "l1" else 1.0 - _ssim(cf, x, data_range=data_range)
        return {"objective": lam * lo + lin, "oracle_loss": lo, "proximity": lin, **{f"oracle_loss/{k}": v for k, v in per_attr.items()}}

    result = search_drift(generate, objective, drifts)
    result.update({"objective": f"{lam:g}*oracle_loss + {proximity}_proximity", "lambda": lam, "proximity": proximity})
    return result
