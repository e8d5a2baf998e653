"""An ignite/MONAI evaluator that edits held-out images and scores the counterfactuals against ground truth.

Pieces (each usable on its own):

- :class:`PipelineEditor` — a counterfactual pipeline (any object with the ``resolve`` / ``edit`` / ``encoder`` /
  ``model`` of :class:`~monai_ld.pipeline.CounterfactualPipeline`, which this layer does not import) at one δ as an
  :data:`~monai_ld.evaluation.axioms.EditFn` ``(images, source_rows, target_rows) -> images`` (one plan per sample,
  so every sample has its own source and target).
- :class:`CounterfactualEvaluator` — a :class:`monai.engines.Evaluator` whose iteration computes the counterfactual
  of each factual towards its partner's attributes (source = the factual's own attributes) and, for the first
  ``axiom_subjects`` samples, the composition (null intervention, ``k`` times) and reversibility (one cycle back)
  edits. Its output dict feeds the metrics of :mod:`.set_metrics`.
- :func:`evaluate_counterfactuals` — runs the evaluator once per δ and returns per-δ results with flat ``metrics``.

The pairs come from :mod:`.pairs` (:func:`~.pairs.load_counterfactual_pairs`); the metric definitions are in
:mod:`.set_metrics`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.engines import Evaluator

from ..conditioning import AttributeEncoder
from ._checks import EvaluationError
from .axioms import composition as _composition
from .oracle import AttributeOracle
from .pairs import (  # noqa: F401  (the data half used to live here: callers import these from this module)
    MANIFEST_PAIR_COLUMNS,
    add_latent_oracle,
    intervened_attributes,
    intervention_targets,
    load_counterfactual_pairs,
    load_reference,
    make_batches,
    read_manifest,
)
from .set_metrics import FLAT_METRICS, CounterfactualSetMetrics, counterfactual_metrics, flat_metrics  # noqa: F401

__all__ = [
    "MANIFEST_PAIR_COLUMNS",
    "read_manifest",
    "add_latent_oracle",
    "load_counterfactual_pairs",
    "load_reference",
    "intervened_attributes",
    "intervention_targets",
    "PipelineEditor",
    "CounterfactualEvaluator",
    "CounterfactualSetMetrics",
    "counterfactual_metrics",
    "make_batches",
    "evaluate_counterfactuals",
    "FLAT_METRICS",
]


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# the generator under test
# ---------------------------------------------------------------------------------------------------------------
class PipelineEditor:
    """A :class:`~monai_ld.pipeline.CounterfactualPipeline` at a fixed δ and edit settings, as an ``EditFn``.

    The pipeline is taken as given, never imported: evaluation sits below the pipeline layer.

    ``editor(images, source_rows, target_rows)`` -> counterfactual images; :meth:`edit` also returns the
    reconstructions. Each sample gets its own validated plan (``pipe.resolve``) and the same seed, so an edit is a
    deterministic function of its input image and rows.

    Args:
        pipe: the pipeline.
        drift: LD δ for generation.
        settings: other plan settings (``num_inference_steps``, ``strength``, ``guidance_scale``, ``seed``,
            ``composition``, ``abduction``); ``None`` values fall back to the pipeline's defaults.
    """

    def __init__(self, pipe, drift: float = 0.0, **settings: Any):
        self.pipe = pipe
        self.drift = float(drift)
        self.settings = {k: v for k, v in settings.items() if v is not None}
        self.calls = 0
        self.seconds = 0.0

    def plan(self, source: Mapping, target: Mapping) -> dict:
        return self.pipe.resolve(dict(target), dict(source), drift=self.drift, **self.settings)

    @torch.no_grad()
    def edit(self, images: torch.Tensor, source_rows: Sequence[Mapping], target_rows: Sequence[Mapping]) -> SimpleNamespace:
        if len(source_rows) != images.shape[0] or len(target_rows) != images.shape[0]:
            raise EvaluationError(f"{images.shape[0]} images but {len(source_rows)} source / {len(target_rows)} target rows")
        t0 = time.perf_counter()
        parts: dict[str, list[torch.Tensor]] = {"image": [], "reconstruction": [], "change": []}
        for i in range(images.shape[0]):
            out = self.pipe.edit(images[i : i + 1], self.plan(source_rows[i], target_rows[i]))
            for k, v in parts.items():
                v.append(getattr(out, k).to(images.device, images.dtype))
        self.calls += images.shape[0]
        self.seconds += time.perf_counter() - t0
        return SimpleNamespace(**{k: torch.cat(v) for k, v in parts.items()})

    def __call__(self, images: torch.Tensor, source_rows: Sequence[Mapping], target_rows: Sequence[Mapping]) -> torch.Tensor:
        return self.edit(images, source_rows, target_rows).image

    @torch.no_grad()
    def autoencode(self, images: torch.Tensor) -> torch.Tensor:
        """``D(E(images))`` with the model's autoencoder (posterior mean, as the pipeline encodes), one sample at a
        time: ``(B, C, *spatial)``."""
        ae = self.pipe.model.autoencoder
        dev = next(ae.parameters()).device
        out = [ae.decode(ae.encode(images[i : i + 1].to(dev))[0]) for i in range(images.shape[0])]
        return torch.cat(out).to(images.device, images.dtype)


# ---------------------------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------------------------
def _lower_is_better(current: float, prev: float) -> bool:
    return current < prev if prev >= 0 else True


def _l1_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().reshape(a.shape[0], -1).mean(1)


class CounterfactualEvaluator(Evaluator):
    """MONAI ``Evaluator`` over batches of ground-truth pairs (see :func:`make_batches`).

    Each iteration returns ``{"input", "counterfactual", "reconstruction", "ground_truth", "source", "target",
    "intervened", "image_id", "composition": {k: (B,)}, "reversibility": (B,)}`` (axiom distances are NaN for
    samples beyond ``axiom_subjects``), which the attached metrics consume.

    Args:
        device: torch device for the images.
        val_data_loader: iterable of batches (dicts with ``image``/``ground_truth`` ``(B, C, *spatial)`` tensors and
            ``source``/``target`` lists of attribute dicts).
        editor: the generator, ``EditFn``-like with an ``edit`` method returning ``.image`` / ``.reconstruction``
            (:class:`PipelineEditor`), or a plain ``EditFn`` (the reconstruction is then taken as the input).
        composition_steps: ``k`` values for the null-intervention composition (``()`` skips it).
        reversibility: run the cycle-back edit.
        axiom_subjects: how many samples (in order) get the composition/reversibility edits (None = all); each costs
            ``max(composition_steps) + 1`` extra edits.
        key_val_metric, additional_metrics, val_handlers: as in :class:`monai.engines.Evaluator` (see
            :func:`counterfactual_metrics`).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Sequence[Mapping],
        editor: Callable,
        epoch_length: int | None = None,
        composition_steps: Sequence[int] = (1, 2),
        reversibility: bool = True,
        axiom_subjects: int | None = None,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        val_handlers: Sequence | None = None,
    ):
        if epoch_length is None:
            epoch_length = len(val_data_loader)
        super().__init__(
            device=device, val_data_loader=val_data_loader, epoch_length=epoch_length,
            key_val_metric=key_val_metric, additional_metrics=additional_metrics, val_handlers=val_handlers,
            metric_cmp_fn=_lower_is_better, decollate=False,
        )
        self.editor = editor
        self.composition_steps = sorted({int(k) for k in composition_steps})
        if self.composition_steps and self.composition_steps[0] < 1:
            raise EvaluationError(f"composition_steps must be positive, got {list(composition_steps)}")
        self.reversibility = bool(reversibility)
        self.axiom_subjects = None if axiom_subjects is None else int(axiom_subjects)
        self._seen = 0
        self.add_event_handler(Events.EPOCH_STARTED, self._reset_count)

    def _reset_count(self, _engine: Engine) -> None:
        self._seen = 0

    def _edit(self, x, src, tgt):
        if hasattr(self.editor, "edit"):
            return self.editor.edit(x, src, tgt)
        cf = self.editor(x, src, tgt)
        return SimpleNamespace(image=cf, reconstruction=x, change=cf - x)

    def _iteration(self, engine: Engine, batchdata: Mapping) -> dict:
        dev = engine.state.device
        x = batchdata["image"].to(dev)
        gt = batchdata["ground_truth"].to(dev)
        src, tgt = list(batchdata["source"]), list(batchdata["target"])
        out = self._edit(x, src, tgt)
        cf, rec = out.image, out.reconstruction
        change = getattr(out, "change", None)
        b = x.shape[0]
        nan = torch.full((b,), float("nan"))
        comp = {k: nan.clone() for k in self.composition_steps}
        rev = nan.clone()
        budget = b if self.axiom_subjects is None else max(0, min(b, self.axiom_subjects - self._seen))
        if budget:
            sel = list(range(budget))
            xs = x[sel]
            if self.composition_steps:
                res = _composition(self.editor, xs, [src[i] for i in sel], steps=self.composition_steps, distance="l1")
                for k, vals in res["per_sample"].items():
                    comp[int(k)][:budget] = torch.tensor([float("nan") if v is None else v for v in vals])
            if self.reversibility:
                with torch.no_grad():
                    back = self._edit(cf[sel], [tgt[i] for i in sel], [src[i] for i in sel]).image
                rev[:budget] = _l1_per_sample(back, xs).cpu()
        self._seen += b
        extra = {"latent_oracle": batchdata["latent_oracle"].to(dev)} if "latent_oracle" in batchdata else {}
        return {
            **extra,
            "input": x, "counterfactual": cf, "reconstruction": rec, "ground_truth": gt, "source": src, "target": tgt,
            "change": cf - rec if change is None else change,
            "intervened": list(batchdata["intervened"]) if "intervened" in batchdata
            else [intervened_attributes(s, t, _encoder_of(self.editor)) for s, t in zip(src, tgt)],
            "image_id": list(batchdata.get("image_id", [""] * b)), "composition": comp, "reversibility": rev,
        }


def _encoder_of(editor) -> AttributeEncoder:
    pipe = getattr(editor, "pipe", None)
    if pipe is None:
        raise EvaluationError("batches must carry 'intervened' when the editor is not a PipelineEditor")
    return pipe.encoder


# ---------------------------------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------------------------------
def evaluate_counterfactuals(
    pipe,
    pairs: Sequence[Mapping],
    drifts: Sequence[float],
    oracle: AttributeOracle | None = None,
    reference: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    composition_steps: Sequence[int] = (1, 2),
    axiom_subjects: int | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Run :class:`CounterfactualEvaluator` once per δ over ``pairs`` (from :func:`load_counterfactual_pairs`).

    Args:
        pipe: a :class:`~monai_ld.pipeline.CounterfactualPipeline` (or an object with its ``resolve`` / ``edit`` /
            ``encoder`` / ``model``).
        drifts: the δ values to evaluate.
        oracle, reference: see :class:`CounterfactualSetMetrics` (``reference["images"]`` is used to compute
            ``reference["features"]`` when only images are given).
        settings: edit settings for every δ (see :class:`PipelineEditor`).

    Returns:
        ``{"by_drift": {str(δ): {"drift", "metrics" (flat scalars), "details" (everything), "notes", "seconds",
        "edits"}}, "collected": {str(δ): tensors/rows for figures}}``.
    """
    if not pairs:
        raise EvaluationError("no pairs to evaluate")
    if not drifts:
        raise EvaluationError("no drift values to evaluate")
    enc = pipe.encoder
    if oracle is not None:
        missing = [n for n in enc.names if n not in oracle.encoder.names]
        if missing:
            raise EvaluationError(f"the oracle does not predict the model's attribute(s) {missing}")
    if reference is not None and oracle is not None and "features" not in reference:
        reference = {**reference, "features": oracle.features(reference["images"])}
    batches = add_latent_oracle(make_batches(pairs, batch_size), PipelineEditor(pipe).autoencode)
    spatial = tuple(pairs[0]["image"].shape[1:])
    out: dict = {"by_drift": {}, "collected": {}}
    for d in drifts:
        editor = PipelineEditor(pipe, drift=float(d), **dict(settings or {}))
        key, extra = counterfactual_metrics(spatial, enc, oracle=oracle, reference=reference, latent_oracle=True)
        engine = CounterfactualEvaluator(device, batches, editor, composition_steps=composition_steps,
                                         axiom_subjects=axiom_subjects, key_val_metric=key, additional_metrics=extra)
        if progress:
            engine.add_event_handler(
                Events.ITERATION_COMPLETED,
                lambda e, d=d, ed=editor: _log(f"  δ={d:g}: {e.state.iteration}/{e.state.epoch_length} batches, "
                                               f"{ed.calls} edits, {ed.seconds:.0f} s", True))
        t0 = time.perf_counter()
        engine.run()
        notes: dict[str, str] = {}
        metrics = flat_metrics(engine.state.metrics, notes)
        metrics["drift"] = float(d)
        details = dict(engine.state.metrics["set_metrics"])
        notes.update({f"details.{k}": v for k, v in details.pop("notes").items()})
        out["by_drift"][str(float(d))] = {
            "drift": float(d), "metrics": metrics, "details": details, "notes": notes,
            "seconds": round(time.perf_counter() - t0, 1), "edits": editor.calls,
            "seconds_per_edit": round(editor.seconds / max(editor.calls, 1), 2),
        }
        out["collected"][str(float(d))] = extra["set_metrics"].collected()
    return out
