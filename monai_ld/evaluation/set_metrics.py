"""The metrics a :class:`~.evaluator.CounterfactualEvaluator` carries, and the flat per-δ numbers they give.

- :func:`counterfactual_metrics` — the metrics to attach: MONAI :class:`~monai.handlers.IgniteMetricHandler`s over
  MONAI's ``MAEMetric`` / ``SSIMMetric`` / ``PSNRMetric`` (similarity to the input, ground-truth error, the
  unchanged-input and autoencoder-reconstruction baselines) and :class:`CounterfactualSetMetrics` (an ignite
  ``Metric`` that keeps the whole set for the set-level numbers: effectiveness, minimality, realism, composition,
  reversibility, ground-truth details).
- :func:`flat_metrics` — one engine run's ``state.metrics`` as flat scalars (``None`` with a note when not computable).

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
- ``minimality``: :func:`~monai_ld.evaluation.divergence.minimality` score (lower is better) in oracle-feature space,
  reference = the real reference split, per intervened attribute, averaged over samples.
- ``fid`` / ``kid`` / ``mmd``: counterfactuals vs the real reference split on oracle penultimate features
  (``"oracle-penultimate"``, not Inception); ``fid_reference`` / ``kid_reference`` / ``mmd_reference``: the held-out
  REAL inputs vs the same reference at the same sample size — the floor that small-set bias leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from monai.handlers import IgniteMetricHandler
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric

from ..conditioning import AttributeEncoder, CategoricalAttribute
from ._checks import EvaluationError, to_float
from .axioms import effectiveness as _effectiveness
from .axioms import ground_truth_error
from .divergence import minimality
from .oracle import ORACLE_FEATURE_NETWORK, AttributeOracle
from .realism import realism_metrics
from .similarity import ssim_window

__all__ = ["FLAT_METRICS", "CounterfactualSetMetrics", "counterfactual_metrics", "flat_metrics"]

# the flat metrics every evaluation report has (a number, or None with the reason under notes)
FLAT_METRICS = ("fid", "kid", "mmd", "ssim", "psnr", "effectiveness", "composition", "reversibility", "minimality",
                "gt_l1", "gt_ssim")


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




def flat_metrics(state_metrics: Mapping[str, Any], notes: dict) -> dict:
    """Flat scalars from an engine's ``state.metrics``; a metric that is not a finite number is ``None`` and its
    reason goes to ``notes["metrics.<name>"]``."""
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
