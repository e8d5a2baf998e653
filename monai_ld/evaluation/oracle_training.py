"""Training the attribute oracle: augmentation and per-attribute loss weights, and the bundle's oracle job.

- :func:`fit_oracle` — :func:`~.oracle.train_oracle` plus what small phantom sets need (:class:`OracleTraining`:
  cosine learning rate, per-attribute loss weights, :class:`Augmentation`).
- :func:`train_oracle_from_manifest` — what ``configs/train_oracle.json`` calls: train on a manifest's train split
  (preprocessed like the model's inputs), score on the validation split, save ``oracle.pt`` (+ a JSON of its scores).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..conditioning import AttributeEncoder, CategoricalAttribute
from ..utils import log_progress, set_threads
from .axioms import effectiveness
from .oracle import AttributeOracle, train_oracle
from .pairs import load_reference
from .report import write_json

__all__ = ["Augmentation", "OracleTraining", "fit_oracle", "train_oracle_from_manifest"]


@dataclass(frozen=True)
class Augmentation:
    """Random flips along ``flip_axes`` (spatial axis indices where a mirror image is still a valid sample, e.g. the
    left-right axis of a brain — not of a chest radiograph), integer shifts up to ``max_shift`` voxels (circular; the
    background is black) and a random intensity scale/offset of up to ``intensity`` — per sample."""

    flip_axes: tuple[int, ...] = ()
    max_shift: int = 0
    intensity: float = 0.0

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = x.clone()
        b = x.shape[0]
        for ax in self.flip_axes:
            m = torch.rand(b, generator=g) < 0.5
            if m.any():
                x[m] = x[m].flip(2 + int(ax))
        if self.max_shift:
            for i in range(b):
                shifts = [int(v) for v in torch.randint(-self.max_shift, self.max_shift + 1, (x.ndim - 2,), generator=g)]
                x[i] = torch.roll(x[i], shifts=shifts, dims=tuple(range(1, x.ndim - 1)))
        if self.intensity:
            shape = (b,) + (1,) * (x.ndim - 1)
            scale = 1 + (torch.rand(shape, generator=g) * 2 - 1) * self.intensity
            offset = (torch.rand(shape, generator=g) * 2 - 1) * self.intensity * 0.5
            x = x * scale + offset
        return x


@dataclass(frozen=True)
class OracleTraining:
    """How :func:`fit_oracle` trains. ``loss_weights``: per attribute, 1 when absent (a continuous attribute's MSE on
    the [0, 1] scale is ~10x smaller than a cross-entropy, so it would otherwise barely train)."""

    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    augmentation: Augmentation = Augmentation()
    seed: int = 0

    def record(self) -> dict:
        """The flat dict the oracle report keeps under ``training``."""
        a = self.augmentation
        return {"epochs": int(self.epochs), "batch_size": int(self.batch_size), "lr": self.lr,
                "weight_decay": self.weight_decay, "loss_weights": dict(self.loss_weights),
                "flip_axes": list(a.flip_axes), "max_shift": int(a.max_shift), "intensity": a.intensity, "seed": self.seed}


def fit_oracle(
    images: torch.Tensor,
    rows: Sequence[Mapping],
    encoder: AttributeEncoder,
    training: OracleTraining | None = None,
    device: str = "cpu",
    **oracle_kwargs: Any,
) -> AttributeOracle:
    """Train an :class:`AttributeOracle` as ``training`` says (default :class:`OracleTraining`: weighted loss,
    augmentation, cosine learning rate; :func:`~.oracle.train_oracle`'s loop); ``oracle_kwargs`` build the network
    (``channels``, ...)."""
    t = training or OracleTraining()
    return train_oracle(images, rows, encoder, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                        weight_decay=t.weight_decay, seed=t.seed, device=device, loss_weights=t.loss_weights,
                        augmentation=t.augmentation, cosine_lr=True, **oracle_kwargs)


def train_oracle_from_manifest(
    manifest: str | os.PathLike,
    output: str | os.PathLike,
    attributes: Sequence[Mapping[str, Any]],
    preprocessing: Mapping[str, Any],
    split: str | Sequence[str] = "train",
    val_split: str | None = "val",
    extra_manifests: Sequence[str | os.PathLike] = (),
    epochs: int = 40,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    loss_weights: Mapping[str, float] | None = None,
    flip_axes: Sequence[int] = (),
    max_shift: int = 0,
    intensity: float = 0.0,
    channels: Sequence[int] = (8, 16, 32, 64),
    seed: int = 0,
    max_samples: int | None = None,
    report: str | os.PathLike | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Train an :class:`AttributeOracle` on the real images of ``split`` (:func:`fit_oracle`) and save it to ``output``.

    The images go through the model's preprocessing chain (the oracle judges counterfactuals in model space).
    ``extra_manifests``: more training images, every factual row (other identities, e.g. the brain campaign's
    ``train_extra`` set, which trains the diffusion model too).
    Validation: :func:`~.axioms.effectiveness` of the oracle's predictions against the TRUE attributes of
    ``val_split`` (of ``manifest``) (accuracy / macro-F1 / MAE per attribute), beside the majority-class / train-mean baselines.
    Returns (and writes to ``report`` when given) ``{"output", "n_train", "n_val", "epochs", "final_loss",
    "validation", "validation_baselines", "history", "config", "training", "seconds"}``.
    """
    set_threads(num_threads)
    enc = AttributeEncoder(attributes)
    t0 = time.perf_counter()
    images, rows, _ = load_reference(manifest, preprocessing, enc, split, limit=max_samples)
    for extra in extra_manifests:
        more, more_rows, _ = load_reference(extra, preprocessing, enc, None, limit=max_samples)
        images, rows = torch.cat([images, more]), rows + more_rows
    log_progress(f"oracle: {images.shape[0]} training images {tuple(images.shape[1:])} loaded in {time.perf_counter() - t0:.0f} s", progress)
    training = OracleTraining(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                              loss_weights=dict(loss_weights or {}), seed=seed,
                              augmentation=Augmentation(tuple(flip_axes), max_shift, intensity))
    oracle = fit_oracle(images, rows, enc, training, device=device, channels=tuple(channels)).cpu()
    result: dict[str, Any] = {"output": str(output), "n_train": int(images.shape[0]), "epochs": int(epochs),
                              "final_loss": oracle.history[-1]["loss"] if oracle.history else None,
                              "history": oracle.history, "config": oracle.config(), "training": training.record(), "split": split,
                              "extra_manifests": [os.path.basename(os.path.dirname(os.fspath(m))) for m in extra_manifests]}
    if val_split:
        vimg, vrows, _ = load_reference(manifest, preprocessing, enc, val_split)
        result["n_val"] = int(vimg.shape[0])
        result["validation"] = effectiveness(oracle.predict(vimg), vrows, enc)
        base = {}  # majority-class / train-mean predictors, so the numbers can be read
        for a in enc.attributes:
            if isinstance(a, CategoricalAttribute):
                counts = [sum(1 for r in vrows if r[a.name] == c) for c in a.classes]
                base[a.name] = {"majority_accuracy": max(counts) / len(vrows)}
            else:
                vals = torch.tensor([r[a.name] for r in rows], dtype=torch.float64)
                vv = torch.tensor([r[a.name] for r in vrows], dtype=torch.float64)
                base[a.name] = {"mae_predicting_train_mean": float((vv - vals.mean()).abs().mean())}
        result["validation_baselines"] = base
    oracle.save(output)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if report:
        write_json(report, result)
    log_progress(f"oracle: saved {output}; validation: {json.dumps(result.get('validation'), default=str)}", progress)
    return result
