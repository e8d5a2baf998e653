"""A volumetric oracle: a categorical attribute (the brain's diagnosis) from regional volumes, as volumetry studies
classify it — the second oracle beside the image CNN (:class:`~.oracle.AttributeOracle`).

Why: on the brain phantom the diagnosis moves only the ventricles and the medial temporal lobe, by ~1.5 mm; the CNN
oracle, trained on a few hundred 64³ images, names the target class of the EXACT ground-truth counterfactual in only
about a third of the val pairs, so it cannot score an edit. The label-map volumes of the ventricles, hippocampi and
amygdalae with the brain's volume (head size) separate the classes (``benchmarks/dx_separability.py``).

:class:`VolumeOracle` is a multinomial logistic regression on the log volumes (ml), fitted on a manifest's label-map
volume columns of one split (the training subjects, factual rows). A counterfactual's volumes are its input's
label-map volumes plus the change measured from the images (:func:`~.volumes.volume_change`, in the input's
regions): :func:`edited_volumes`. Scored that way on the exact ground-truth image, the same oracle gives its ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._checks import EvaluationError

__all__ = ["VOLUME_FEATURES", "VolumeOracle", "edited_volumes"]

#: manifest volume columns the oracle reads; the brain volume stands for head size (the diagnosis leaves it unchanged)
VOLUME_FEATURES = ("ventricle_ml", "hippocampus_ml", "amygdala_ml", "brain_ml")
#: measured structure (:data:`~.volumes.STRUCTURES`) -> its volume column
_CHANGED = {"ventricles": "ventricle_ml", "hippocampus": "hippocampus_ml", "amygdala": "amygdala_ml"}


class VolumeOracle:
    """``classes`` of ``attribute`` from log regional volumes (:data:`VOLUME_FEATURES`).

    Fit with :meth:`fit` (balanced class weights, L2 ``l2`` on the weights; deterministic L-BFGS in float64).
    :meth:`predict_proba`: ``(N, len(features))`` volumes in ml -> ``(N, K)`` probabilities.
    """

    def __init__(self, attribute: str, classes: Sequence[str], features: Sequence[str] = VOLUME_FEATURES):
        self.attribute, self.classes, self.features = attribute, tuple(classes), tuple(features)
        self.linear = torch.nn.Linear(len(self.features), len(self.classes)).double()
        self.mean = torch.zeros(len(self.features), dtype=torch.float64)
        self.std = torch.ones(len(self.features), dtype=torch.float64)

    def _design(self, volumes: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(volumes, dtype=torch.float64).reshape(-1, len(self.features))
        if not torch.isfinite(v).all() or (v <= 0).any():
            raise EvaluationError(f"volumes must be finite and positive (ml) for {list(self.features)}; got {v.tolist()}")
        return (v.log() - self.mean) / self.std

    def fit(self, rows: Sequence[Mapping], l2: float = 1e-3) -> VolumeOracle:
        """Fit on manifest rows (``rows[i][feature]`` in ml, ``rows[i][attribute]`` one of ``classes``)."""
        bad = sorted({str(r.get(self.attribute)) for r in rows} - set(self.classes))
        if not rows or bad:
            raise EvaluationError(f"the volume oracle needs rows whose {self.attribute!r} is one of {list(self.classes)}"
                                  + (f"; got {bad}" if bad else "; got none"))
        v = torch.tensor([[float(r[f]) for f in self.features] for r in rows], dtype=torch.float64).log()
        self.mean, self.std = v.mean(0), v.std(0).clamp(min=1e-12)
        y = torch.tensor([self.classes.index(str(r[self.attribute])) for r in rows])
        weight = len(y) / (len(self.classes) * torch.bincount(y, minlength=len(self.classes)).clamp(min=1).double())
        x = (v - self.mean) / self.std
        opt = torch.optim.LBFGS(self.linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.linear(x), y, weight=weight) + l2 * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.no_grad():  # a convex problem: start at zero (deterministic, no global RNG touched)
            self.linear.weight.zero_()
            self.linear.bias.zero_()
        opt.step(closure)
        self.train_accuracy = float((self.linear(x).argmax(1) == y).double().mean())
        return self

    @torch.no_grad()
    def predict_proba(self, volumes: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
        return self.linear(self._design(volumes)).softmax(1)

    def predict(self, volumes: Sequence[Sequence[float]] | torch.Tensor) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(volumes).argmax(1).tolist()]


def edited_volumes(source: Mapping, change_ml: Mapping[str, float], features: Sequence[str] = VOLUME_FEATURES) -> list[float]:
    """An edited image's volumes (ml, in ``features`` order): the input's label-map volumes (``source``, a manifest
    row) plus the change measured from the images (``change_ml``: structure -> ml, e.g. one structure entry of
    :func:`~.volumes.pair_volume_changes`); columns no structure measures (the brain) keep the input's value. A
    measured loss beyond 99 % of a structure is kept at 1 % of it (log volumes; such an edit reads as extreme)."""
    by_col = {col: float(change_ml[s]) for s, col in _CHANGED.items() if s in change_ml}
    return [max(float(source[f]) + by_col.get(f, 0.0), 0.01 * float(source[f])) for f in features]
