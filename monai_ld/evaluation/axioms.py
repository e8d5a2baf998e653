"""Counterfactual axioms (Monteiro et al. 2023; Melistas et al. 2024) and ground-truth error.

The generator under test is a plain callable, never a particular inferer::

    edit(images: (B, C, *spatial), source_rows: list[dict], target_rows: list[dict]) -> (B, C, *spatial)

(e.g. ``lambda x, s, t: inferer.counterfactual(x, s, t, ...)``). Predictions come from any oracle
(:class:`~monai_ld.evaluation.oracle.AttributeOracle` or a ``predict(images) -> {name: (B,)}`` callable).

- :func:`effectiveness` — oracle predictions on counterfactuals vs the INTENDED target values: accuracy and macro-F1
  (categorical), MAE in the attribute's units and normalised by its declared range (continuous).
- :func:`composition` — null intervention (target = source) applied k times; mean distance to the original.
- :func:`reversibility` — change an attribute and change it back, cycles repeated; distance to the original.
- :func:`minimality` — counterfactual-latent-divergence score (Sanchez & Tsaftaris 2022, as used by Melistas et al.;
  in :mod:`.divergence`).
- :func:`ground_truth_error` — L1/SSIM of the counterfactual AND of the unchanged input against the exact
  ground-truth counterfactual (does the edit beat doing nothing?).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..conditioning import AttributeEncoder, CategoricalAttribute
from ._checks import EvaluationError, check_images, check_pair, to_float
from .divergence import minimality, minimality_bins
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
