"""Counterfactual axioms (Monteiro et al. 2023; Melistas et al. 2024) and ground-truth error.

The generator under test is a plain callable, never a particular inferer::

    edit(images: (B, C, *spatial), source_rows: list[dict], target_rows: list[dict]) -> (B, C, *spatial)

(e.g. ``lambda x, s, t: inferer.counterfactual(x, s, t, ...)``). Predictions come from any oracle
(:class:`~monai_ld.evaluation.oracle.AttributeOracle` or a ``predict(images) -> {name: (B,)}`` callable).

- :func:`effectiveness` — oracle predictions on counterfactuals vs the INTENDED target values: accuracy and macro-F1
  (categorical), MAE in the attribute's units and normalised by its declared range (continuous).
- :func:`composition` — null intervention (target = source) applied k times; mean distance to the original.
- :func:`reversibility` — change an attribute and change it back, cycles repeated; distance to the original.
- :func:`minimality` — counterfactual-latent-divergence score (Sanchez & Tsaftaris 2022, as used by Melistas et al.).
- :func:`ground_truth_error` — L1/SSIM of the counterfactual AND of the unchanged input against the exact
  ground-truth counterfactual (does the edit beat doing nothing?).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from ..conditioning import AttributeEncoder, CategoricalAttribute, ContinuousAttribute
from ._checks import EvaluationError, check_features, check_images, check_pair, to_float
from .similarity import l1 as _l1
from .similarity import ssim as _ssim

__all__ = [
    "EditFn",
    "effectiveness",
    "effectiveness_from_images",
    "macro_f1",
    "composition",
    "reversibility",
    "minimality",
    "minimality_bins",
    "ground_truth_error",
]

EditFn = Callable[[torch.Tensor, list, list], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# effectiveness
# ---------------------------------------------------------------------------------------------------------------
def macro_f1(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred`` (sklearn's default
    label set); a class with no true and no predicted samples does not count."""
    y_true, y_pred = torch.as_tensor(y_true).long().reshape(-1), torch.as_tensor(y_pred).long().reshape(-1)
    if y_true.numel() != y_pred.numel() or y_true.numel() == 0:
        raise EvaluationError(f"macro_f1: {y_true.numel()} targets vs {y_pred.numel()} predictions")
    f1s = []
    for c in torch.unique(torch.cat([y_true, y_pred])):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def _class_indices(a: CategoricalAttribute, values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        if values.ndim == 2:  # probabilities / logits
            return values.argmax(dim=1).long()
        return values.reshape(-1).long()
    return torch.tensor([a.validate(v) for v in values], dtype=torch.long)


def effectiveness(
    predictions: Mapping[str, torch.Tensor | Sequence],
    target_rows: Sequence[Mapping],
    encoder: AttributeEncoder | Sequence[Mapping],
    attributes: Sequence[str] | None = None,
) -> dict:
    """Oracle predictions on counterfactuals scored against the intended targets, per attribute.

    Args:
        predictions: ``{name: values}`` for ``B`` counterfactuals: continuous ``(B,)`` in the attribute's units;
            categorical ``(B,)`` class indices, ``(B, K)`` probabilities/logits, or a list of class names.
        target_rows: ``B`` dicts of intended target values (partial rows allowed: rows lacking an attribute are
            left out of that attribute's score).
        encoder: attribute specs.
        attributes: which attributes to score (default: all that appear in both predictions and targets).

    Returns:
        ``{name: {"accuracy", "macro_f1", "n"}}`` (categorical) or ``{name: {"mae", "mae_normalised", "n"}}``
        (continuous; ``mae_normalised`` = MAE / (high - low)).
    """
    encoder = encoder if isinstance(encoder, AttributeEncoder) else AttributeEncoder(encoder)
    targets = [encoder.validate(r, partial=True) for r in target_rows]
    names = list(attributes) if attributes is not None else [n for n in encoder.names if n in predictions and any(n in t for t in targets)]
    if not names:
        raise EvaluationError("effectiveness: no attribute is present in both predictions and target rows")
    out = {}
    for name in names:
        a = encoder[name]
        if name not in predictions:
            raise EvaluationError(f"effectiveness: no predictions for attribute {name!r}")
        pred = predictions[name]
        n_pred = pred.shape[0] if isinstance(pred, torch.Tensor) else len(pred)
        if n_pred != len(targets):
            raise EvaluationError(f"effectiveness: {n_pred} predictions for {name!r} but {len(targets)} target rows")
        keep = torch.tensor([name in t for t in targets], dtype=torch.bool)
        if not keep.any():
            raise EvaluationError(f"effectiveness: no target row sets {name!r}")
        if isinstance(a, CategoricalAttribute):
            p = _class_indices(a, pred)[keep]
            t = torch.tensor([a.validate(t[name]) for t in targets if name in t], dtype=torch.long)
            out[name] = {"accuracy": float((p == t).double().mean()), "macro_f1": macro_f1(t, p), "n": int(keep.sum())}
        else:
            p = torch.as_tensor(pred, dtype=torch.float64).reshape(-1)[keep]
            t = torch.tensor([t[name] for t in targets if name in t], dtype=torch.float64)
            mae = float((p - t).abs().mean())
            out[name] = {"mae": mae, "mae_normalised": mae / (a.high - a.low), "n": int(keep.sum())}
    return out


def effectiveness_from_images(
    predict: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    counterfactuals: torch.Tensor,
    target_rows: Sequence[Mapping],
    encoder: AttributeEncoder | Sequence[Mapping],
    attributes: Sequence[str] | None = None,
) -> dict:
    """:func:`effectiveness` of ``predict(counterfactuals)``; ``predict`` is e.g. ``AttributeOracle.predict``
    (an :class:`AttributeOracle` itself is accepted too)."""
    counterfactuals = check_images(counterfactuals, "counterfactuals")
    fn = getattr(predict, "predict", predict)
    return effectiveness(fn(counterfactuals), target_rows, encoder, attributes)


# ---------------------------------------------------------------------------------------------------------------
# composition / reversibility
# ---------------------------------------------------------------------------------------------------------------
def _distance_fn(distance, embed):
    if callable(distance):
        base = distance
    elif distance == "l1":
        base = lambda a, b: (a - b).abs().reshape(a.shape[0], -1).mean(1)  # noqa: E731
    elif distance == "l2":
        base = lambda a, b: (a - b).pow(2).reshape(a.shape[0], -1).mean(1).sqrt()  # noqa: E731
    else:
        raise EvaluationError(f"distance must be 'l1', 'l2' or a callable (a, b) -> (B,), got {distance!r}")
    if embed is None:
        return base
    return lambda a, b: base(embed(a), embed(b))


def _apply(edit: EditFn, x: torch.Tensor, src: list, tgt: list) -> torch.Tensor:
    with torch.no_grad():
        y = edit(x, src, tgt)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise EvaluationError(f"edit returned {shape} for input {tuple(x.shape)}; it must return the input's shape")
    return y


def _summary(key: str, per: dict[int, torch.Tensor], distance) -> dict:
    return {
        key: {str(k): to_float(v.double().mean()) for k, v in per.items()},
        "per_sample": {str(k): [to_float(x) for x in v] for k, v in per.items()},
        "distance": distance if isinstance(distance, str) else getattr(distance, "__name__", "callable"),
    }


def composition(
    edit: EditFn,
    images: torch.Tensor,
    rows: Sequence[Mapping],
    steps: Sequence[int] = (1, 10),
    distance: str | Callable = "l1",
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Apply the null intervention (target = source) repeatedly; distance to the original after ``k`` applications.

    Args:
        edit: the counterfactual callable (see module doc).
        images: ``(B, C, *spatial)`` originals.
        rows: ``B`` attribute dicts (source = target).
        steps: the ``k`` to report (``max(steps)`` edits are run in sequence).
        distance: ``"l1"`` (mean |a - b| per sample), ``"l2"`` (RMS) or a callable ``(a, b) -> (B,)``.
        embed: optional ``(B, C, *s) -> (B, F)`` map; distances are then taken between embeddings.

    Returns:
        ``{"steps": {"1": mean, "10": mean}, "per_sample": {"1": [...], ...}, "distance": name}``; 0 is perfect.
    """
    images = check_images(images)
    rows = list(rows)
    if len(rows) != images.shape[0]:
        raise EvaluationError(f"composition: {images.shape[0]} images but {len(rows)} rows")
    ks = sorted({int(k) for k in steps})
    if not ks or ks[0] < 1:
        raise EvaluationError(f"composition: steps must be positive integers, got {list(steps)}")
    dist = _distance_fn(distance, embed)
    cur, per = images, {}
    for i in range(1, ks[-1] + 1):
        cur = _apply(edit, cur, rows, rows)
        if i in ks:
            per[i] = dist(cur, images).detach().cpu()
    return _summary("steps", per, distance)


def reversibility(
    edit: EditFn,
    images: torch.Tensor,
    source_rows: Sequence[Mapping],
    target_rows: Sequence[Mapping],
    cycles: Sequence[int] = (1,),
    distance: str | Callable = "l1",
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Change attributes source -> target, then back target -> source; repeat; distance to the original.

    Args:
        edit: the counterfactual callable.
        images: ``(B, C, *spatial)`` originals.
        source_rows: ``B`` full attribute dicts of the originals.
        target_rows: ``B`` dicts of the changed attributes; partial rows are completed from the source row.
        cycles: numbers of (forward, backward) cycles after which the distance is reported.
        distance, embed: as in :func:`composition`.

    Returns:
        ``{"cycles": {"1": mean, ...}, "per_sample": {...}, "distance": name}``; 0 is perfect.
    """
    images = check_images(images)
    src = [dict(r) for r in source_rows]
    if len(src) != images.shape[0] or len(target_rows) != images.shape[0]:
        raise EvaluationError(f"reversibility: {images.shape[0]} images, {len(src)} source rows, {len(target_rows)} target rows")
    tgt = [{**s, **dict(t)} for s, t in zip(src, target_rows)]
    cs = sorted({int(c) for c in cycles})
    if not cs or cs[0] < 1:
        raise EvaluationError(f"reversibility: cycles must be positive integers, got {list(cycles)}")
    dist = _distance_fn(distance, embed)
    cur, per = images, {}
    for i in range(1, cs[-1] + 1):
        cur = _apply(edit, _apply(edit, cur, src, tgt), tgt, src)
        if i in cs:
            per[i] = dist(cur, images).detach().cpu()
    return _summary("cycles", per, distance)


# ---------------------------------------------------------------------------------------------------------------
# minimality
# ---------------------------------------------------------------------------------------------------------------
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
    n, r = f.shape[0], ref.shape[0]
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


# ---------------------------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------------------------
def ground_truth_error(
    counterfactuals: torch.Tensor,
    ground_truth: torch.Tensor,
    inputs: torch.Tensor,
    data_range: float = 1.0,
    mask=None,
) -> dict:
    """Distance of the counterfactual, and of the unchanged input, to the exact ground-truth counterfactual.

    Args:
        counterfactuals: ``(B, C, *spatial)`` generated counterfactuals.
        ground_truth: ``(B, C, *spatial)`` exact counterfactuals (same identity, target attributes).
        inputs: ``(B, C, *spatial)`` the factual images that were edited (the "do nothing" baseline).
        data_range: intensity range for SSIM.
        mask: optional region (see :mod:`~monai_ld.evaluation.similarity`); scores are then inside it.

    Returns:
        ``{"counterfactual": {"l1", "ssim"}, "input": {"l1", "ssim"}, "l1_improvement": input_l1 - cf_l1,
        "fraction_closer_than_input": share of samples with cf L1 < input L1, "per_sample": {...}}``.
    """
    cf, gt = check_pair(counterfactuals, ground_truth, ("counterfactuals", "ground_truth"))
    inp, _ = check_pair(inputs, ground_truth, ("inputs", "ground_truth"))
    cf_l1 = _l1(cf, gt, mask=mask, reduction="none")
    in_l1 = _l1(inp, gt, mask=mask, reduction="none")
    cf_ssim = _ssim(cf, gt, data_range=data_range, mask=mask, reduction="none")
    in_ssim = _ssim(inp, gt, data_range=data_range, mask=mask, reduction="none")

    def m(v):
        return to_float(torch.nanmean(v.double()))

    return {
        "counterfactual": {"l1": m(cf_l1), "ssim": m(cf_ssim)},
        "input": {"l1": m(in_l1), "ssim": m(in_ssim)},
        "l1_improvement": m(in_l1 - cf_l1),
        "fraction_closer_than_input": float((cf_l1 < in_l1).double().mean()),
        "per_sample": {
            "counterfactual_l1": [to_float(v) for v in cf_l1],
            "input_l1": [to_float(v) for v in in_l1],
            "counterfactual_ssim": [to_float(v) for v in cf_ssim],
            "input_ssim": [to_float(v) for v in in_ssim],
        },
    }
