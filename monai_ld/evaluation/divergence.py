"""Minimality as counterfactual latent divergence (Sanchez & Tsaftaris 2022, as used by Melistas et al. 2024).

Apart from the other axioms (:mod:`.axioms`) because it is a different kind of measure: it needs no edit function
and no oracle predictions, only features of the factual, the counterfactual and a real reference set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..conditioning import CategoricalAttribute, ContinuousAttribute
from ._checks import EvaluationError, check_features, to_float

__all__ = ["minimality", "minimality_bins"]


def minimality_bins(attribute: ContinuousAttribute, n_bins: int = 5) -> torch.Tensor:
    """Inner edges of ``n_bins`` equal-width bins over the attribute's declared ``[low, high]``."""
    if n_bins < 2:
        raise EvaluationError(f"n_bins must be >= 2, got {n_bins}")
    return torch.linspace(attribute.low, attribute.high, n_bins + 1, dtype=torch.float64)[1:-1]


def _groups(values: Sequence, attribute, bins) -> torch.Tensor:
    """Integer group id per value: class index, bin index (continuous), or identity of the raw value."""
    if isinstance(attribute, CategoricalAttribute):
        return torch.tensor([attribute.validate(v) for v in values], dtype=torch.long)
    if isinstance(attribute, ContinuousAttribute):
        v = torch.tensor([attribute.validate(x) for x in values], dtype=torch.float64)
        edges = minimality_bins(attribute, bins) if isinstance(bins, int) else torch.as_tensor(bins, dtype=torch.float64)
        return torch.searchsorted(edges, v, right=True)
    if bins is not None and not isinstance(bins, int):  # no spec: explicit edges bin the raw numbers
        v = torch.as_tensor([float(x) for x in values], dtype=torch.float64)
        edges = torch.as_tensor(bins, dtype=torch.float64)
        return torch.searchsorted(edges, v, right=True)
    lookup: dict = {}
    return torch.tensor([lookup.setdefault(x, len(lookup)) for x in values], dtype=torch.long)


def minimality(
    factual_feats: torch.Tensor,
    counterfactual_feats: torch.Tensor,
    reference_feats: torch.Tensor,
    factual_values: Sequence,
    counterfactual_values: Sequence,
    reference_values: Sequence,
    attribute: ContinuousAttribute | CategoricalAttribute | None = None,
    bins: int | Sequence[float] | None = 5,
    weights: tuple[float, float] = (0.8, 0.2),
    distance: str = "l1",
) -> dict:
    """Counterfactual-latent-divergence minimality score (lower is better), per counterfactual and mean.

    For factual ``f`` with attribute value ``a`` and its counterfactual ``cf`` with intended value ``a'``, all in a
    feature space (e.g. the oracle's penultimate layer), let ``d = dist(cf, f)``. Over a REAL reference set:

    - ``P1`` = fraction of reference samples with value ``a'`` (same class / bin) whose distance TO THE FACTUAL is
      ``<= d`` — small when ``cf`` is closer to ``f`` than other members of the target group are (minimal change);
    - ``P2`` = fraction of reference samples with value ``a`` whose distance TO THE FACTUAL is ``>= d`` — small when
      ``cf`` has moved at least as far as typical members of the factual's own group (it did change);
    - ``score = log(w1·e^{P1} + w2·e^{P2})`` with ``(w1, w2) = (0.8, 0.2)``; range ``[0, 1]``.

    Reference point (the open choice): every distance is measured FROM THE FACTUAL ``f``, so ``d`` and both
    reference distributions share one origin and are comparable. This matches Melistas et al.'s public code
    (``S_f = dist(fs, f)``, ``S_cf = dist(cfs, f)``). Measuring reference distances from ``cf`` instead would make
    ``P1`` a density of target-group samples around ``cf`` (a realism notion) rather than a minimality one. If ``f``
    itself is in the reference set it contributes distance 0 to ``P2`` (counted only when ``d = 0``).

    Args:
        factual_feats, counterfactual_feats: ``(N, F)`` paired features.
        reference_feats: ``(R, F)`` features of real samples.
        factual_values, counterfactual_values, reference_values: the intervened attribute's value for each sample
            (``N``, ``N``, ``R``).
        attribute: the attribute spec: categorical values compare by class; continuous values are binned into
            ``bins`` equal-width bins over its declared range (or ``bins`` = explicit inner edges). ``None``:
            values compare by equality (or binned by explicit ``bins`` edges).
        weights: ``(w1, w2)``.
        distance: ``"l1"`` (mean absolute difference over features, as in Melistas et al.) or ``"l2"``.

    Returns:
        ``{"score", "p1", "p2", "n", "skipped", "per_sample": {"score", "p1", "p2"}, "reference_point": "factual",
        "distance", "notes"}``; a counterfactual whose target or source group is empty in the reference set is
        skipped (score None) and counted.
    """
    f = check_features(factual_feats, "factual features", 1)
    cf = check_features(counterfactual_feats, "counterfactual features", 1)
    ref = check_features(reference_feats, "reference features", 1)
    if f.shape != cf.shape or f.shape[1] != ref.shape[1]:
        raise EvaluationError(f"minimality: factual {tuple(f.shape)}, counterfactual {tuple(cf.shape)}, reference {tuple(ref.shape)} features do not match")
    if len(factual_values) != f.shape[0] or len(counterfactual_values) != f.shape[0] or len(reference_values) != ref.shape[0]:
        raise EvaluationError("minimality: one attribute value per feature row is required")
    if distance == "l1":
        dist = lambda a, b: (a - b).abs().mean(-1)  # noqa: E731
    elif distance == "l2":
        dist = lambda a, b: (a - b).pow(2).sum(-1).sqrt()  # noqa: E731
    else:
        raise EvaluationError(f"minimality: distance must be 'l1' or 'l2', got {distance!r}")
    g_all = _groups(list(factual_values) + list(counterfactual_values) + list(reference_values), attribute, bins)
    n = f.shape[0]
    g_f, g_cf, g_ref = g_all[:n], g_all[n : 2 * n], g_all[2 * n :]
    w1, w2 = weights
    d = dist(cf, f)
    scores, p1s, p2s = [], [], []
    for i in range(n):
        s_ref = dist(ref, f[i : i + 1])
        same_cf, same_f = g_ref == g_cf[i], g_ref == g_f[i]
        if not same_cf.any() or not same_f.any():
            scores.append(None), p1s.append(None), p2s.append(None)
            continue
        p1 = float((s_ref[same_cf] <= d[i]).double().mean())
        p2 = float((s_ref[same_f] >= d[i]).double().mean())
        p1s.append(p1), p2s.append(p2)
        scores.append(math.log(w1 * math.exp(p1) + w2 * math.exp(p2)))
    ok = [i for i, s in enumerate(scores) if s is not None]
    notes = {}
    if len(ok) < n:
        notes["skipped"] = f"{n - len(ok)} counterfactual(s) had no reference sample in their source or target group"

    def mean(v):
        return to_float(sum(v[i] for i in ok) / len(ok)) if ok else None

    return {
        "score": mean(scores),
        "p1": mean(p1s),
        "p2": mean(p2s),
        "n": len(ok),
        "skipped": n - len(ok),
        "per_sample": {"score": scores, "p1": p1s, "p2": p2s},
        "reference_point": "factual",
        "distance": distance,
        "weights": list(weights),
        "notes": notes,
    }
