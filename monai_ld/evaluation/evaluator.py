"""An ignite/MONAI evaluator that edits held-out images and scores the counterfactuals against ground truth.

Pieces (each usable on its own):

- :func:`load_counterfactual_pairs` — the test rows of a phantom-style manifest that have a ground-truth counterfactual
  partner (``counterfactual_of`` = the factual's ``image_id``), preprocessed TOGETHER (the factual drives the
  foreground crop, so both images share one grid); :func:`load_reference` — real images + attribute rows of a split.
- :class:`PipelineEditor` — a :class:`~monai_ld.pipeline.CounterfactualPipeline` at one δ as an
  :data:`~monai_ld.evaluation.axioms.EditFn` ``(images, source_rows, target_rows) -> images`` (one plan per sample,
  so every sample has its own source and target).
- :class:`CounterfactualEvaluator` — a :class:`monai.engines.Evaluator` whose iteration computes the counterfactual
  of each factual towards its partner's attributes (source = the factual's own attributes) and, for the first
  ``axiom_subjects`` samples, the composition (null intervention, ``k`` times) and reversibility (one cycle back)
  edits. Its output dict feeds ignite metrics.
- :func:`counterfactual_metrics` — the metrics to attach: MONAI :class:`~monai.handlers.IgniteMetricHandler`s over
  MONAI's ``MAEMetric`` / ``SSIMMetric`` / ``PSNRMetric`` (similarity to the input, ground-truth error, the
  unchanged-input and autoencoder-reconstruction baselines) and :class:`CounterfactualSetMetrics` (an ignite
  ``Metric`` that keeps the whole set for the set-level numbers: effectiveness, minimality, realism, composition,
  reversibility, ground-truth details).
- :func:`evaluate_counterfactuals` — runs the evaluator once per δ and returns per-δ results with flat ``metrics``.

Definitions used for the flat per-δ ``metrics`` (all from the library functions of this package):

- ``ssim`` / ``psnr`` / ``l1``: counterfactual vs its input (how much the edit changed); data range 1.
- ``gt_l1`` / ``gt_ssim``: counterfactual vs the exact ground-truth counterfactual; ``gt_l1_input`` / ``gt_ssim_input``
  score the unchanged input the same way (doing nothing), ``gt_l1_reconstruction`` the autoencoder reconstruction
  (the floor a non-residual edit starts from), ``gt_l1_latent_oracle`` the ceiling the autoencoder allows,
  ``x + D(E(gt)) - D(E(x))`` (when it is not below ``gt_l1_input``, no diffusion training can beat doing nothing;
  null for a generator without an autoencoder); ``gt_change_correlation``: Pearson correlation, per sample, between
  the model's change (:attr:`CounterfactualOutput.change`: ``cf - reconstruction``, or ``cf - D(z^s_0)`` for the
  paired composition) and the true change ``gt - input`` (1 = the right change in the right
  place), averaged.
- ``effectiveness``: success rate over (sample, intervened attribute): the oracle reads the intended target —
  categorical: predicted class = target class; continuous: prediction closer to the target than to the source
  value. ``effectiveness_input`` (oracle on the unchanged input) and ``effectiveness_ground_truth`` (oracle on the
  exact counterfactual) bracket it. Per-attribute accuracy / macro-F1 / MAE are under ``details``.
- ``composition``: mean L1 to the original after one null intervention (target = source); ``composition_k<K>``
  after ``K``. ``reversibility``: mean L1 to the original after source -> target -> source (the forward edit is the
  counterfactual already computed). Both in image space, 0 = perfect.
- ``minimality``: :func:`~monai_ld.evaluation.axioms.minimality` score (lower is better) in oracle-feature space,
  reference = the real reference split, per intervened attribute, averaged over samples.
- ``fid`` / ``kid`` / ``mmd``: counterfactuals vs the real reference split on oracle penultimate features
  (``"oracle-penultimate"``, not Inception); ``fid_reference`` / ``kid_reference`` / ``mmd_reference``: the held-out
  REAL inputs vs the same reference at the same sample size — the floor that small-set bias leaves.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from monai.engines import Evaluator
from monai.handlers import IgniteMetricHandler
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric

from ..conditioning import AttributeEncoder, CategoricalAttribute, ContinuousAttribute
from ._checks import EvaluationError, to_float
from .axioms import composition as _composition
from .axioms import effectiveness as _effectiveness
from .axioms import ground_truth_error, minimality
from .oracle import ORACLE_FEATURE_NETWORK, AttributeOracle
from .realism import realism_metrics
from .similarity import ssim_window

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

MANIFEST_PAIR_COLUMNS = ("image_id", "path", "split", "counterfactual_of")
FLAT_METRICS = ("fid", "kid", "mmd", "ssim", "psnr", "effectiveness", "composition", "reversibility", "minimality",
                "gt_l1", "gt_ssim")


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def read_manifest(manifest: str | Path, encoder: AttributeEncoder, required: Sequence[str] = MANIFEST_PAIR_COLUMNS) -> list[dict]:
    """Rows of a CSV manifest as string dicts; checks the columns the evaluation needs (clear error naming them)."""
    p = Path(manifest)
    if not p.is_file():
        raise FileNotFoundError(f"manifest '{p}' does not exist")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = [dict(r) for r in reader]
    need = list(required) + [n for n in encoder.names if n not in required]
    missing = [c for c in need if c not in columns]
    if missing:
        raise EvaluationError(
            f"manifest '{p}' lacks column(s) {', '.join(missing)}; an evaluation manifest needs {', '.join(need)} "
            f"(phantom manifests from `monai-ld phantoms` have them; ground-truth pairs are rows whose "
            f"'counterfactual_of' names a factual image_id)")
    for r in rows:
        r["image_id"] = str(r["image_id"])
        r["_root"] = str(p.parent)
    return rows


def _abs_path(row: Mapping) -> str:
    q = Path(row["path"])
    return str(q if q.is_absolute() else Path(row["_root"]) / q)


def _row_attrs(row: Mapping, encoder: AttributeEncoder, where: str) -> dict:
    try:
        return encoder.validate({n: row[n] for n in encoder.names})
    except ValueError as e:
        raise EvaluationError(f"{where}: {e}") from None


def intervened_attributes(source: Mapping, target: Mapping, encoder: AttributeEncoder) -> list[str]:
    """Names of the attributes whose value differs between two (validated) rows."""
    out = []
    for a in encoder.attributes:
        s, t = source[a.name], target[a.name]
        if isinstance(a, ContinuousAttribute):
            if abs(float(s) - float(t)) > 1e-6:
                out.append(a.name)
        elif a.validate(s) != a.validate(t):
            out.append(a.name)
    return out


def _build_chain(preprocessing: Mapping, keys: Sequence[str]):
    from ..pipeline import build_chain

    return build_chain({**dict(preprocessing), "keys": tuple(keys)})


def load_counterfactual_pairs(
    manifest: str | Path,
    preprocessing: Mapping[str, Any],
    encoder: AttributeEncoder,
    split: str | None = "test",
    max_subjects: int | None = None,
) -> list[dict]:
    """Factual rows of ``split`` with a ground-truth counterfactual partner, preprocessed for the model.

    Returns one dict per (factual, ground truth) pair: ``{"image": (1, *spatial), "ground_truth": (1, *spatial),
    "source": factual attributes, "target": the partner's attributes, "intervened": [names], "image_id",
    "gt_id", "subject_id"}``. Both images go through ONE call of the preprocessing chain with keys
    ``("image", "ground_truth")``: the factual drives the foreground crop, so both share a grid (each image keeps
    its own percentile intensity scaling, as any scan would). ``max_subjects`` keeps the first N factual images
    (manifest order) and all of their partners.
    """
    enc = encoder
    rows = read_manifest(manifest, enc)
    by_id = {r["image_id"]: r for r in rows}
    pairs: list[tuple[dict, dict]] = []
    for r in rows:
        of = (r.get("counterfactual_of") or "").strip()
        if not of:
            continue
        f = by_id.get(of)
        if f is None:
            raise EvaluationError(f"manifest '{manifest}': row {r['image_id']!r} is a counterfactual of {of!r}, which is not in the manifest")
        if split is not None and f.get("split") != split:
            continue
        pairs.append((f, r))
    if not pairs:
        splits = sorted({r.get("split", "") for r in rows if (r.get("counterfactual_of") or "").strip()})
        raise EvaluationError(
            f"manifest '{manifest}' has no ground-truth counterfactual pairs in split {split!r} (pairs exist in: "
            f"{', '.join(splits) or 'none'}); the evaluation needs rows whose 'counterfactual_of' names a factual image")
    if max_subjects is not None:
        keep: list[str] = []
        for f, _ in pairs:
            if f["image_id"] not in keep:
                keep.append(f["image_id"])
        keep = keep[: int(max_subjects)]
        pairs = [(f, r) for f, r in pairs if f["image_id"] in keep]
    chain = _build_chain(preprocessing, ("image", "ground_truth"))
    out = []
    for f, r in pairs:
        src = _row_attrs(f, enc, f"manifest row {f['image_id']!r}")
        tgt = _row_attrs(r, enc, f"manifest row {r['image_id']!r}")
        d = chain({"image": _abs_path(f), "ground_truth": _abs_path(r)})
        out.append({
            "image": torch.as_tensor(d["image"]).float().contiguous(),
            "ground_truth": torch.as_tensor(d["ground_truth"]).float().contiguous(),
            "source": src, "target": tgt, "intervened": intervened_attributes(src, tgt, enc),
            "image_id": f["image_id"], "gt_id": r["image_id"], "subject_id": f.get("subject_id", f["image_id"]),
        })
    return out


def load_reference(
    manifest: str | Path,
    preprocessing: Mapping[str, Any],
    encoder: AttributeEncoder,
    split: str | Sequence[str] | None = "train",
    limit: int | None = None,
    factual_only: bool = True,
) -> tuple[torch.Tensor, list[dict], list[str]]:
    """Real images of ``split`` (factual rows only by default) -> ``(images (N, 1, *spatial), attribute rows, ids)``."""
    rows = read_manifest(manifest, encoder, required=("image_id", "path", "split"))
    splits = None if split is None else ([split] if isinstance(split, str) else list(split))
    sel = [r for r in rows if (splits is None or r.get("split") in splits)
           and not (factual_only and (r.get("counterfactual_of") or "").strip())]
    if limit is not None:
        sel = sel[: int(limit)]
    if not sel:
        raise EvaluationError(f"manifest '{manifest}' has no rows in split {split!r}")
    chain = _build_chain(preprocessing, ("image",))
    images = [torch.as_tensor(chain({"image": _abs_path(r)})["image"]).float() for r in sel]
    attrs = [_row_attrs(r, encoder, f"manifest row {r['image_id']!r}") for r in sel]
    return torch.stack(images), attrs, [r["image_id"] for r in sel]


def intervention_targets(rows: Sequence[Mapping], encoder: AttributeEncoder, seed: int = 0,
                         continuous_shift: tuple[float, float] = (0.25, 0.5)) -> list[dict]:
    """One single-attribute intervention per row (for δ sweeps on splits without ground-truth pairs).

    Seeded: the attribute is drawn uniformly; a categorical one moves to another class (uniform), a continuous one by
    ``U(continuous_shift) x (high - low)`` upward, or downward when upward would leave the declared range.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for row in rows:
        row = encoder.validate(row)
        a = encoder.attributes[int(torch.randint(len(encoder.attributes), (1,), generator=g))]
        t = dict(row)
        if isinstance(a, CategoricalAttribute):
            others = [c for c in a.classes if c != row[a.name]]
            t[a.name] = others[int(torch.randint(len(others), (1,), generator=g))]
        else:
            lo, hi = continuous_shift
            step = (lo + (hi - lo) * float(torch.rand(1, generator=g))) * (a.high - a.low)
            v = row[a.name] + step if row[a.name] + step <= a.high else row[a.name] - step
            t[a.name] = round(min(max(v, a.low), a.high), 1)
        out.append(t)
    return out


def make_batches(pairs: Sequence[Mapping], batch_size: int = 1) -> list[dict]:
    """Collate pair dicts into batches: tensors stacked, everything else kept as lists."""
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        b = {}
        for k in chunk[0]:
            vals = [p[k] for p in chunk]
            b[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
        batches.append(b)
    return batches


def add_latent_oracle(batches: Sequence[dict], autoencode: Callable[[torch.Tensor], torch.Tensor]) -> list[dict]:
    """Give each batch ``latent_oracle = image + D(E(ground_truth)) - D(E(image))``: a perfect diffusion model seen
    through the autoencoder ``autoencode`` (``D(E(.))``, e.g. :meth:`PipelineEditor.autoencode`). It does not depend on
    δ or the edit settings, so it is computed once per pair set, not per edit."""
    with torch.no_grad():
        return [{**b, "latent_oracle": b["image"] + autoencode(b["ground_truth"]) - autoencode(b["image"])} for b in batches]


# ---------------------------------------------------------------------------------------------------------------
# the generator under test
# ---------------------------------------------------------------------------------------------------------------
class PipelineEditor:
    """A :class:`~monai_ld.pipeline.CounterfactualPipeline` at a fixed δ and edit settings, as an ``EditFn``.

    ``editor(images, source_rows, target_rows)`` -> counterfactual images; :meth:`edit` also returns the
    reconstructions. Each sample gets its own validated plan (``pipe.resolve``) and the same seed, so an edit is a
    deterministic function of its input image and rows.

    Args:
        pipe: the pipeline.
        drift: LD δ for generation.
        settings: other plan settings (``num_inference_steps``, ``strength``, ``guidance``, ``seed``,
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
# metrics
# ---------------------------------------------------------------------------------------------------------------
def _pair(a: str, b: str) -> Callable[[Mapping], tuple[torch.Tensor, torch.Tensor]]:
    return lambda o: (o[a].float(), o[b].float())


def counterfactual_metrics(
    spatial_shape: Sequence[int],
    encoder: AttributeEncoder,
    oracle: AttributeOracle | None = None,
    reference: Mapping[str, Any] | None = None,
    data_range: float = 1.0,
    latent_oracle: bool = False,
    **set_kwargs: Any,
) -> tuple[dict[str, Metric], dict[str, Metric]]:
    """``(key_val_metric, additional_metrics)`` for :class:`CounterfactualEvaluator`.

    Per-sample similarity numbers are MONAI metrics behind :class:`~monai.handlers.IgniteMetricHandler`
    (SSIM: Gaussian window σ = 1.5, shrunk to fit small images — the same as :func:`~.similarity.ssim`); the
    set-level ones come from :class:`CounterfactualSetMetrics` (``reference``: ``{"features": (R, F), "rows": [...]}``
    of real images, for minimality and realism). ``latent_oracle``: also score ``gt_l1_latent_oracle`` (the batches
    must carry ``latent_oracle``: :func:`add_latent_oracle`).
    """
    sd = len(spatial_shape)
    k = ssim_window(spatial_shape)

    def ssim_h(a, b):
        return IgniteMetricHandler(SSIMMetric(spatial_dims=sd, data_range=data_range, win_size=k, kernel_sigma=1.5),
                                   output_transform=_pair(a, b), save_details=False)

    def mae_h(a, b):
        return IgniteMetricHandler(MAEMetric(), output_transform=_pair(a, b), save_details=False)

    key = {"gt_l1": mae_h("counterfactual", "ground_truth")}
    extra = {
        "gt_ssim": ssim_h("counterfactual", "ground_truth"),
        "gt_l1_input": mae_h("input", "ground_truth"),
        "gt_ssim_input": ssim_h("input", "ground_truth"),
        "gt_l1_reconstruction": mae_h("reconstruction", "ground_truth"),
        "l1": mae_h("counterfactual", "input"),
        "ssim": ssim_h("counterfactual", "input"),
        "psnr": IgniteMetricHandler(PSNRMetric(max_val=data_range), output_transform=_pair("counterfactual", "input"), save_details=False),
        "set_metrics": CounterfactualSetMetrics(encoder, oracle=oracle, reference=reference, data_range=data_range, **set_kwargs),
    }
    if latent_oracle:
        extra["gt_l1_latent_oracle"] = mae_h("latent_oracle", "ground_truth")
    return key, extra


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-30), torch.full_like(den, float("nan")))


def _nan_summary(v: torch.Tensor) -> dict:
    ok = v[torch.isfinite(v)]
    return {"mean": to_float(ok.double().mean()) if ok.numel() else None, "n": int(ok.numel()),
            "per_sample": [to_float(x) if math.isfinite(float(x)) else None for x in v]}


class CounterfactualSetMetrics(Metric):
    """Ignite ``Metric`` keeping every (input, counterfactual, ground truth) of an epoch for set-level scores.

    :meth:`compute` returns ``{"n", "ground_truth", "change_correlation", "composition", "reversibility",
    "effectiveness", "minimality", "realism", "realism_reference", "notes"}`` (see the module doc); parts that
    need the oracle are ``None`` with a note when there is none. :meth:`collected` gives the kept tensors.

    Args:
        encoder: attribute specs.
        oracle: trained :class:`AttributeOracle` (effectiveness, minimality, realism features) or None.
        reference: ``{"features": (R, F) oracle features of real images, "rows": R attribute dicts}``.
        minimality_bins: bins for continuous attributes in minimality.
        kid_subsets, kid_subset_size, seed: KID settings.
    """

    def __init__(self, encoder: AttributeEncoder, oracle: AttributeOracle | None = None, reference: Mapping | None = None,
                 data_range: float = 1.0, minimality_bins: int = 5, kid_subsets: int = 100,
                 kid_subset_size: int | None = None, seed: int = 0, output_transform: Callable = lambda o: o):
        self.encoder = encoder
        self.oracle = oracle
        self.reference = reference
        self.data_range = float(data_range)
        self.minimality_bins = int(minimality_bins)
        self.kid_subsets, self.kid_subset_size, self.seed = int(kid_subsets), kid_subset_size, int(seed)
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._t: dict[str, list[torch.Tensor]] = {k: [] for k in ("input", "counterfactual", "reconstruction", "ground_truth", "change")}
        self._rows: dict[str, list] = {k: [] for k in ("source", "target", "intervened", "image_id")}
        self._comp: dict[int, list[torch.Tensor]] = {}
        self._rev: list[torch.Tensor] = []

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        """The engine output is one mapping (not ignite's ``(y_pred, y)``): hand it to :meth:`update` whole."""
        self.update(self._output_transform(engine.state.output))

    def update(self, output: Mapping) -> None:
        for k in self._t:
            v = output[k] if k != "change" or "change" in output else output["counterfactual"] - output["reconstruction"]
            self._t[k].append(v.detach().float().cpu())
        for k in self._rows:
            self._rows[k].extend(output[k])
        for k, v in output.get("composition", {}).items():
            self._comp.setdefault(int(k), []).append(torch.as_tensor(v, dtype=torch.float64).cpu())
        if output.get("reversibility") is not None:
            self._rev.append(torch.as_tensor(output["reversibility"], dtype=torch.float64).cpu())

    def collected(self) -> dict:
        """The kept tensors ``(N, C, *spatial)`` and rows of the last epoch."""
        if not self._t["input"]:
            return {}
        return {**{k: torch.cat(v) for k, v in self._t.items()}, **{k: list(v) for k, v in self._rows.items()}}

    # -- parts ----------------------------------------------------------------------------------------------------
    def _effectiveness(self, pred: Mapping[str, torch.Tensor], src: list, tgt: list, intervened: list) -> dict:
        enc = self.encoder
        hits: dict[str, list[bool]] = {}
        for i, names in enumerate(intervened):
            for n in names:
                a, p = enc[n], pred[n][i]
                if isinstance(a, CategoricalAttribute):
                    ok = int(p) == a.validate(tgt[i][n])
                else:
                    ok = abs(float(p) - float(tgt[i][n])) < abs(float(p) - float(src[i][n]))
                hits.setdefault(n, []).append(bool(ok))
        total = [h for v in hits.values() for h in v]
        out = {"success_rate": sum(total) / len(total) if total else None, "n": len(total),
               "per_attribute": {n: {"success_rate": sum(v) / len(v), "n": len(v)} for n, v in hits.items()}}
        # the library's per-attribute scores vs the intended targets: intervened attributes, then preserved ones
        inter_rows = [{n: t[n] for n in names} for t, names in zip(tgt, intervened)]
        kept_rows = [{n: t[n] for n in enc.names if n not in names} for t, names in zip(tgt, intervened)]
        if any(inter_rows):
            names = [n for n in enc.names if any(n in r for r in inter_rows)]
            out["intervened"] = _effectiveness(pred, inter_rows, enc, names)
        if any(kept_rows):
            names = [n for n in enc.names if any(n in r for r in kept_rows)]
            out["preserved"] = _effectiveness(pred, kept_rows, enc, names)
        return out

    def _minimality(self, f_feat, cf_feat, src, tgt, intervened) -> dict:
        ref_f, ref_rows = self.reference["features"], self.reference["rows"]
        scores: list = [None] * len(src)
        per_attr = {}
        for n in self.encoder.names:
            idx = [i for i, names in enumerate(intervened) if names and names[0] == n]
            if not idx:
                continue
            a = self.encoder[n]
            r = minimality(f_feat[idx], cf_feat[idx], ref_f, [src[i][n] for i in idx], [tgt[i][n] for i in idx],
                           [row[n] for row in ref_rows], attribute=a, bins=self.minimality_bins)
            per_attr[n] = {k: r[k] for k in ("score", "p1", "p2", "n", "skipped")}
            for j, i in enumerate(idx):
                scores[i] = r["per_sample"]["score"][j]
        ok = [s for s in scores if s is not None]
        return {"score": sum(ok) / len(ok) if ok else None, "n": len(ok), "per_attribute": per_attr,
                "per_sample": scores, "reference_point": "factual", "distance": "l1 (oracle features)",
                "attribute": "the first intervened attribute of each counterfactual"}

    def _realism(self, real: torch.Tensor, fake: torch.Tensor, what: str, notes: dict) -> dict | None:
        try:
            r = realism_metrics(real, fake, ORACLE_FEATURE_NETWORK, kid_subsets=self.kid_subsets,
                                kid_subset_size=self.kid_subset_size, seed=self.seed)
        except EvaluationError as e:
            notes[what] = f"not computed: {e}"
            return None
        if r["n_fake"] < r["feature_dim"] + 1:
            notes[what + ".small_sample"] = (
                f"{r['n_fake']} images vs {r['feature_dim']}-dim features: the covariance is rank-deficient and FID is "
                f"biased upward at this size; KID and MMD are unbiased but noisy (values below 0 mean the sets are not "
                f"told apart); compare with the *_reference values (held-out real images vs the same reference set at "
                f"the same size), not with published Inception FIDs")
        return r

    def compute(self) -> dict:
        if not self._t["input"]:
            raise NotComputableError("CounterfactualSetMetrics needs at least one batch")
        c = self.collected()
        x, cf, gt, rec = c["input"], c["counterfactual"], c["ground_truth"], c["reconstruction"]
        src, tgt, intervened = c["source"], c["target"], c["intervened"]
        notes: dict[str, str] = {}
        corr = _pearson(c["change"], gt - x)
        out: dict[str, Any] = {
            "n": int(x.shape[0]),
            "image_id": c["image_id"],
            "ground_truth": ground_truth_error(cf, gt, x, data_range=self.data_range),
            "ground_truth_reconstruction": ground_truth_error(rec, gt, x, data_range=self.data_range)["counterfactual"],
            "change_correlation": _nan_summary(corr),
            "composition": {str(k): _nan_summary(torch.cat(v)) for k, v in sorted(self._comp.items())},
            "reversibility": _nan_summary(torch.cat(self._rev)) if self._rev else None,
            "effectiveness": None, "effectiveness_input": None, "effectiveness_ground_truth": None,
            "minimality": None, "realism": None, "realism_reference": None, "notes": notes,
        }
        if not any(intervened):
            notes["effectiveness"] = "no pair changes any attribute (target = source everywhere)"
        if self.oracle is None:
            notes["oracle"] = ("no attribute oracle: effectiveness, minimality and realism (fid/kid/mmd on oracle features) "
                               "are not computed; train one with the bundle's configs/train_oracle.json")
            return out
        pred = {k: v for k, v in self.oracle.predict(cf).items()}
        if any(intervened):
            out["effectiveness"] = self._effectiveness(pred, src, tgt, intervened)
            out["effectiveness_input"] = self._effectiveness(self.oracle.predict(x), src, tgt, intervened)
            out["effectiveness_ground_truth"] = self._effectiveness(self.oracle.predict(gt), src, tgt, intervened)
        f_feat, cf_feat = self.oracle.features(x), self.oracle.features(cf)
        if self.reference is None:
            notes["reference"] = "no real reference set: minimality and realism are not computed"
            return out
        ref_f = self.reference["features"]
        if any(intervened):
            out["minimality"] = self._minimality(f_feat, cf_feat, src, tgt, intervened)
        out["realism"] = self._realism(ref_f, cf_feat, "realism", notes)
        out["realism_reference"] = self._realism(ref_f, f_feat, "realism_reference", notes)
        return out


# ---------------------------------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------------------------------
def _flat_metrics(state_metrics: Mapping[str, Any], composition_steps: Sequence[int], notes: dict) -> dict:
    s = state_metrics["set_metrics"]
    m: dict[str, Any] = {}

    def put(key, value, why=None):
        v = None if value is None else to_float(value)
        if v is not None and not math.isfinite(v):
            v = None
        m[key] = v
        if v is None and why:
            notes.setdefault(f"metrics.{key}", why)

    no_oracle = s["notes"].get("oracle") or s["notes"].get("reference") or "not computed"
    real = s.get("realism") or {}
    ref = s.get("realism_reference") or {}
    put("fid", real.get("fid"), (real.get("notes") or {}).get("fid") or s["notes"].get("realism") or no_oracle)
    put("kid", real.get("kid_mean"), (real.get("notes") or {}).get("kid") or s["notes"].get("realism") or no_oracle)
    put("mmd", real.get("mmd_rbf"), (real.get("notes") or {}).get("mmd_rbf") or s["notes"].get("realism") or no_oracle)
    why = {"psnr": "identical images (PSNR infinite)",
           "gt_l1_latent_oracle": "the batches carry no latent_oracle (a generator without an autoencoder)"}
    for key in ("ssim", "psnr", "l1", "gt_l1", "gt_ssim", "gt_l1_input", "gt_ssim_input", "gt_l1_reconstruction",
                "gt_l1_latent_oracle"):
        put(key, state_metrics.get(key), why.get(key, "not computable"))
    eff = s.get("effectiveness") or {}
    why_eff = s["notes"].get("effectiveness") or no_oracle
    put("effectiveness", eff.get("success_rate"), why_eff)
    put("effectiveness_input", (s.get("effectiveness_input") or {}).get("success_rate"), why_eff)
    put("effectiveness_ground_truth", (s.get("effectiveness_ground_truth") or {}).get("success_rate"), why_eff)
    comp = s.get("composition") or {}
    ks = sorted(int(k) for k in comp)
    why_axiom = "no composition/reversibility edits were run (composition_steps empty or axiom_subjects = 0)"
    put("composition", (comp.get("1") or {}).get("mean") if comp else None, why_axiom)
    for k in ks:
        if k != 1:
            put(f"composition_k{k}", comp[str(k)]["mean"], why_axiom)
    put("reversibility", (s.get("reversibility") or {}).get("mean"), why_axiom)
    put("minimality", (s.get("minimality") or {}).get("score"), why_eff)
    put("gt_change_correlation", s["change_correlation"]["mean"], "the model or the ground truth made no change")
    put("gt_fraction_closer_than_input", s["ground_truth"]["fraction_closer_than_input"])
    put("fid_reference", ref.get("fid"), (ref.get("notes") or {}).get("fid") or s["notes"].get("realism_reference") or no_oracle)
    put("kid_reference", ref.get("kid_mean"), (ref.get("notes") or {}).get("kid") or s["notes"].get("realism_reference") or no_oracle)
    put("mmd_reference", ref.get("mmd_rbf"), (ref.get("notes") or {}).get("mmd_rbf") or s["notes"].get("realism_reference") or no_oracle)
    m["n_subjects"] = s["n"]
    m["n_axiom_subjects"] = (s.get("reversibility") or {}).get("n", 0)
    return m


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
        pipe: a :class:`~monai_ld.pipeline.CounterfactualPipeline`.
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
        metrics = _flat_metrics(engine.state.metrics, composition_steps, notes)
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
