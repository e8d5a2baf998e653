"""Downstream utility: does a classifier trained on synthetic images work on real ones?

:func:`downstream_auc` trains a binary classifier (the compact MONAI ResNet of :class:`AttributeOracle` with a
single two-class head) on synthetic images, another on real training images (and optionally one on both), and
tests each on the same held-out real images; ROC AUC by MONAI's :func:`~monai.metrics.compute_roc_auc`.
"""

from __future__ import annotations


import torch
from monai.metrics import compute_roc_auc

from ..conditioning import AttributeEncoder, CategoricalAttribute
from ._checks import EvaluationError, check_images, to_float
from .oracle import train_oracle

__all__ = ["roc_auc", "binary_labels", "downstream_auc"]


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of ``(N,)`` scores for ``(N,)`` binary labels (MONAI ``compute_roc_auc``; ties count half).

    Raises:
        EvaluationError: mismatched lengths, or labels not containing both 0 and 1.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(labels).reshape(-1).long()
    if s.numel() != y.numel():
        raise EvaluationError(f"roc_auc: {s.numel()} scores but {y.numel()} labels")
    if not torch.equal(torch.unique(y), torch.tensor([0, 1])):
        raise EvaluationError(f"roc_auc: labels must contain both 0 and 1 (and nothing else), got {torch.unique(y).tolist()}")
    return float(compute_roc_auc(s, y))


def binary_labels(labels, attribute: CategoricalAttribute | None = None) -> torch.Tensor:
    """``(N,)`` long 0/1 labels from a tensor / list of ints or (with a two-class ``attribute``) class names."""
    if attribute is not None:
        if len(attribute.classes) != 2:
            raise EvaluationError(f"attribute {attribute.name!r} has {len(attribute.classes)} classes; downstream AUC needs 2")
        y = torch.tensor([attribute.validate(v) for v in labels], dtype=torch.long)
    else:
        y = torch.as_tensor(labels).reshape(-1)
        if y.is_floating_point() and not torch.all(y == y.round()):
            raise EvaluationError("labels must be 0/1 integers")
        y = y.long()
    if not set(torch.unique(y).tolist()) <= {0, 1}:
        raise EvaluationError(f"labels must be 0/1, got values {torch.unique(y).tolist()}")
    return y


def _train_and_score(images, y, test_images, test_y, epochs, batch_size, lr, seed, oracle_kwargs) -> float:
    if len(torch.unique(y)) < 2:
        raise EvaluationError("training labels contain a single class")
    enc = AttributeEncoder([CategoricalAttribute("label", ("0", "1"))])
    rows = [{"label": int(v)} for v in y]
    model = train_oracle(images, rows, enc, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, **oracle_kwargs)
    probs = model.predict_normalised(test_images)["label"][:, 1]
    return roc_auc(probs, test_y)


def downstream_auc(
    synthetic_images: torch.Tensor,
    synthetic_labels,
    real_test_images: torch.Tensor,
    real_test_labels,
    real_train_images: torch.Tensor | None = None,
    real_train_labels=None,
    attribute: CategoricalAttribute | None = None,
    combined: bool = False,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    **oracle_kwargs,
) -> dict:
    """AUC on held-out real images of classifiers trained on synthetic vs real images.

    Args:
        synthetic_images: ``(Ns, C, *spatial)`` generated images; ``synthetic_labels`` their ``(Ns,)`` labels.
        real_test_images: ``(Nt, C, *spatial)`` held-out real images (never trained on); ``real_test_labels``.
        real_train_images: ``(Nr, C, *spatial)`` real training images for the baseline (optional).
        attribute: a two-class spec to read labels given as class names; otherwise labels are 0/1.
        combined: also train on synthetic + real training images (the paper's augmentation setting).
        epochs, batch_size, lr, seed, oracle_kwargs: classifier training (same for every classifier).

    Returns:
        ``{"auc_synthetic", "auc_real", "auc_combined", "n_synthetic", "n_real_train", "n_real_test", "notes"}``;
        a classifier that was not trained gives ``None`` with the reason in ``notes``.
    """
    syn = check_images(synthetic_images, "synthetic images")
    test = check_images(real_test_images, "real test images")
    y_syn, y_test = binary_labels(synthetic_labels, attribute), binary_labels(real_test_labels, attribute)
    if y_syn.numel() != syn.shape[0] or y_test.numel() != test.shape[0]:
        raise EvaluationError("one label per image is required")
    if syn.shape[1:] != test.shape[1:]:
        raise EvaluationError(f"synthetic {tuple(syn.shape)} and real test {tuple(test.shape)} images differ in shape")
    args = (epochs, batch_size, lr, seed, oracle_kwargs)
    out = {"n_synthetic": int(syn.shape[0]), "n_real_test": int(test.shape[0]), "n_real_train": 0, "notes": {}}
    out["auc_synthetic"] = to_float(_train_and_score(syn, y_syn, test, y_test, *args))
    out["auc_real"] = out["auc_combined"] = None
    if real_train_images is None:
        out["notes"]["auc_real"] = "no real training images given"
    else:
        real = check_images(real_train_images, "real training images")
        y_real = binary_labels(real_train_labels, attribute)
        if y_real.numel() != real.shape[0] or real.shape[1:] != test.shape[1:]:
            raise EvaluationError("real training images/labels do not match the test images")
        out["n_real_train"] = int(real.shape[0])
        out["auc_real"] = to_float(_train_and_score(real, y_real, test, y_test, *args))
        if combined:
            out["auc_combined"] = to_float(
                _train_and_score(torch.cat([syn, real]), torch.cat([y_syn, y_real]), test, y_test, *args)
            )
    if not combined:
        out["notes"]["auc_combined"] = "combined=False"
    elif real_train_images is None:
        out["notes"]["auc_combined"] = "no real training images given"
    return out
