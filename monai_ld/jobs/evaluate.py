"""What ``configs/evaluate.json``, ``configs/train_oracle.json`` and ``monai-ld evaluate|sweep-drift`` call.

- :func:`train_oracle_from_manifest` — train the attribute oracle on a manifest's train split (preprocessed like the
  model's inputs), score it on the validation split, save ``oracle.pt`` (+ a JSON of its validation scores).
- :func:`run_sweep` — the δ grid search on held-out images (default: the validation split, one seeded
  single-attribute intervention per image; :func:`~.evaluator.intervention_targets`): objective
  ``"counterfactual"`` (:func:`~.drift_search.search_drift_counterfactual`, needs the oracle) or
  ``"distribution"`` (:func:`~.drift_search.search_drift_distribution` against the real reference split). Writes
  ``report.json`` (``best_drift``, ``curve``), ``report.md`` and ``drift_curve.png``.
- :func:`run_evaluation` — :func:`~.evaluator.evaluate_counterfactuals` over the ground-truth pairs of the test split
  for a list of δ (numbers and/or ``"searched"``: the ``best_drift`` of a sweep report, or of a sweep run first);
  writes ``report.json`` (top-level ``metrics`` for the main δ, ``by_drift`` for all), ``report.md``,
  ``counterfactuals.png`` (main δ), ``counterfactuals_drift_<δ>.png`` (every δ) and ``drift_curve.png`` (when a
  sweep ran or was loaded).

Missing oracle file: effectiveness, minimality and realism are reported as ``null`` with the reason under ``notes``
(the evaluation still runs); a counterfactual δ sweep then falls back to the distribution objective (noted).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..conditioning import AttributeEncoder, CategoricalAttribute
from ._checks import EvaluationError, atomic_write
from .axioms import effectiveness
from .drift_search import drift_grid, search_drift_counterfactual, search_drift_distribution
from .evaluator import (
    FLAT_METRICS,
    evaluate_counterfactuals,
    intervention_targets,
    load_counterfactual_pairs,
    load_reference,
)
from .oracle import AttributeOracle
from .report import plot_counterfactual_grid, plot_drift_curve, write_json
from .volumes import evaluation_volumes, load_pair_labels, volumes_markdown

__all__ = ["fit_oracle", "train_oracle_from_manifest", "run_sweep", "run_evaluation", "load_pipeline", "load_oracle", "parse_drifts"]


def _log(msg: str, progress: bool = True) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(int(num_threads))


def load_pipeline(checkpoint: str | os.PathLike, device: str = "cpu"):
    """The :class:`~monai_ld.pipeline.CounterfactualPipeline` of a model checkpoint (clear error when absent)."""
    from ..pipeline import CounterfactualPipeline

    p = Path(checkpoint)
    if not p.is_file():
        raise FileNotFoundError(f"model checkpoint '{p}' does not exist (train the bundle first, or pass the right bundle)")
    return CounterfactualPipeline.from_checkpoint(p, device=device)


def load_oracle(path: str | os.PathLike | None, notes: dict, device: str = "cpu") -> AttributeOracle | None:
    """The oracle at ``path``, or None with the reason in ``notes["oracle"]``."""
    if path is None or str(path) == "":
        notes["oracle"] = "no oracle path given: effectiveness, minimality and fid/kid/mmd are not computed"
        return None
    p = Path(path)
    if not p.is_file():
        notes["oracle"] = (f"oracle file '{p}' does not exist: effectiveness, minimality and fid/kid/mmd are not computed; "
                           f"train it with the bundle's configs/train_oracle.json")
        return None
    return AttributeOracle.load(p, map_location=device)


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


def _settings(settings: Mapping[str, Any] | None) -> dict:
    s = {k: v for k, v in dict(settings or {}).items() if v is not None}
    if "drift" in s:
        raise EvaluationError("give δ through 'drifts', not through the edit settings")
    return s


# ---------------------------------------------------------------------------------------------------------------
# oracle
# ---------------------------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, g: torch.Generator, flip_axes: Sequence[int], max_shift: int, intensity: float) -> torch.Tensor:
    """Random flips along ``flip_axes`` (spatial axis indices), integer shifts up to ``max_shift`` voxels (circular;
    the background is black), and a random intensity scale/offset of up to ``intensity`` — per sample."""
    x = x.clone()
    b = x.shape[0]
    for ax in flip_axes:
        m = torch.rand(b, generator=g) < 0.5
        if m.any():
            x[m] = x[m].flip(2 + int(ax))
    if max_shift:
        for i in range(b):
            shifts = [int(v) for v in torch.randint(-max_shift, max_shift + 1, (x.ndim - 2,), generator=g)]
            x[i] = torch.roll(x[i], shifts=shifts, dims=tuple(range(1, x.ndim - 1)))
    if intensity:
        shape = (b,) + (1,) * (x.ndim - 1)
        scale = 1 + (torch.rand(shape, generator=g) * 2 - 1) * intensity
        offset = (torch.rand(shape, generator=g) * 2 - 1) * intensity * 0.5
        x = x * scale + offset
    return x


def fit_oracle(
    images: torch.Tensor,
    rows: Sequence[Mapping],
    encoder: AttributeEncoder,
    epochs: int = 40,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    loss_weights: Mapping[str, float] | None = None,
    flip_axes: Sequence[int] = (),
    max_shift: int = 0,
    intensity: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    **oracle_kwargs: Any,
) -> AttributeOracle:
    """Train an :class:`AttributeOracle` with augmentation and per-attribute loss weights (cosine learning rate).

    :func:`~.oracle.train_oracle` is the plain loop; this one adds what small phantom sets need: random flips /
    shifts / intensity changes (``flip_axes``: spatial axes where a mirror image is still a valid sample, e.g. the
    left-right axis of a brain — not of a chest radiograph), and ``loss_weights`` (a continuous attribute's MSE on the
    [0, 1] scale is ~10x smaller than a cross-entropy, so it would otherwise barely train).
    """
    from .oracle import attribute_targets

    targets = attribute_targets(rows, encoder)
    weights = {a.name: float((loss_weights or {}).get(a.name, 1.0)) for a in encoder.attributes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        oracle = AttributeOracle(encoder, spatial_dims=images.ndim - 2, in_channels=images.shape[1], **oracle_kwargs).to(device)
        opt = torch.optim.Adam(oracle.parameters(), lr=lr, weight_decay=weight_decay)
        n = images.shape[0]
        steps = epochs * math.ceil(n / batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        g = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            oracle.train()
            perm = torch.randperm(n, generator=g)
            total, count = 0.0, 0
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                if idx.numel() < 2:
                    idx = torch.cat([idx, perm[:1]])
                x = _augment(images[idx], g, flip_axes, max_shift, intensity).to(device)
                out = oracle(x)
                loss = _weighted_loss(oracle, out, targets, idx, weights)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * idx.numel()
                count += idx.numel()
            oracle.history.append({"epoch": epoch + 1, "loss": total / max(count, 1)})
    oracle.eval()
    return oracle


def _weighted_loss(oracle: AttributeOracle, out: dict, targets: dict, idx: torch.Tensor, weights: Mapping[str, float]):
    """Σ w·MSE (continuous, [0, 1] scale) + Σ w·cross-entropy (categorical) over the rows that carry each attribute."""
    import torch.nn.functional as F

    total = out[oracle.encoder.names[0]].new_zeros(())
    for a in oracle.encoder.attributes:
        vals, known = targets[a.name]
        vals, known = vals[idx], known[idx]
        if not known.any():
            continue
        o = out[a.name][known]
        if isinstance(a, CategoricalAttribute):
            term = F.cross_entropy(o, vals[known].to(o.device))
        else:
            term = F.mse_loss(o, vals[known].to(o))
        total = total + weights[a.name] * term
    return total


def train_oracle_from_manifest(
    manifest: str | os.PathLike,
    output: str | os.PathLike,
    attributes: Sequence[Mapping[str, Any]],
    preprocessing: Mapping[str, Any],
    split: str | Sequence[str] = "train",
    val_split: str | None = "val",
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
    Validation: :func:`~.axioms.effectiveness` of the oracle's predictions against the TRUE attributes of
    ``val_split`` (accuracy / macro-F1 / MAE per attribute), beside the majority-class / train-mean baselines.
    Returns (and writes to ``report`` when given) ``{"output", "n_train", "n_val", "epochs", "final_loss",
    "validation", "validation_baselines", "history", "config", "training", "seconds"}``.
    """
    _threads(num_threads)
    enc = AttributeEncoder(attributes)
    t0 = time.perf_counter()
    images, rows, _ = load_reference(manifest, preprocessing, enc, split, limit=max_samples)
    _log(f"oracle: {images.shape[0]} training images {tuple(images.shape[1:])} loaded in {time.perf_counter() - t0:.0f} s", progress)
    training = {"epochs": int(epochs), "batch_size": int(batch_size), "lr": lr, "weight_decay": weight_decay,
                "loss_weights": dict(loss_weights or {}), "flip_axes": list(flip_axes), "max_shift": int(max_shift),
                "intensity": intensity, "seed": seed}
    oracle = fit_oracle(images, rows, enc, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        loss_weights=loss_weights, flip_axes=flip_axes, max_shift=max_shift, intensity=intensity,
                        seed=seed, device=device, channels=tuple(channels)).cpu()
    result: dict[str, Any] = {"output": str(output), "n_train": int(images.shape[0]), "epochs": int(epochs),
                              "final_loss": oracle.history[-1]["loss"] if oracle.history else None,
                              "history": oracle.history, "config": oracle.config(), "training": training, "split": split}
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
    _log(f"oracle: saved {output}; validation: {json.dumps(result.get('validation'), default=str)}", progress)
    return result


# ---------------------------------------------------------------------------------------------------------------
# δ sweep
# ---------------------------------------------------------------------------------------------------------------
def _reference(manifest, pipe, oracle, split, limit, notes, progress):
    if oracle is None:
        return None
    t0 = time.perf_counter()
    images, rows, _ = load_reference(manifest, pipe.model.meta.get("preprocessing", {}), pipe.encoder, split, limit)
    _log(f"reference: {images.shape[0]} real images of split {split!r} loaded in {time.perf_counter() - t0:.0f} s", progress)
    return {"images": images, "rows": rows, "features": oracle.features(images), "split": split}


def _sweep_markdown(report: Mapping) -> str:
    lines = ["# Latent Drifting δ sweep", "",
             f"Objective: `{report['objective']}`; best δ = **{report['best_drift']:g}** "
             f"(objective {report['best_objective']:.4g}); {report['data']['n_images']} images of split "
             f"`{report['data']['split']}`, {report['settings'].get('num_inference_steps', 'default')} inference steps.", ""]
    curve = report["curve"]
    keys = [k for k in curve[0] if k != "drift"]
    lines += ["| δ | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for e in curve:
        vals = [("n/a" if e.get(k) is None else f"{e[k]:.4g}" if isinstance(e.get(k), float) else str(e.get(k))) for k in keys]
        lines.append(f"| {e['drift']:g} | " + " | ".join(vals) + " |")
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- `{k}`: {v}" for k, v in report["notes"].items()]
    return "\n".join(lines) + "\n"


def run_sweep(
    checkpoint: str | os.PathLike,
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    oracle: str | os.PathLike | None = None,
    split: str = "val",
    drifts: Any = None,
    max_subjects: int | None = 6,
    objective: str = "counterfactual",
    distance: str = "l1_mean",
    lam: float = 1.0,
    proximity: str = "l1",
    settings: Mapping[str, Any] | None = None,
    reference_split: str = "train",
    max_reference: int | None = 200,
    seed: int = 0,
    device: str = "cpu",
    num_threads: int | None = None,
    progress: bool = True,
    _pipe=None,
    _oracle: AttributeOracle | None = None,
    _notes: dict | None = None,
) -> dict:
    """Grid search for δ on held-out images; writes ``report.json`` / ``report.md`` / ``drift_curve.png``.

    Args:
        split: the split whose factual images are edited (default ``"val"``: no test image picks its own δ).
        drifts: grid (list, ``"a:b:step"`` or None = −0.2…0.2 step 0.05).
        max_subjects: first N factual images of ``split``.
        objective: ``"counterfactual"`` (``lam · oracle loss + proximity``) or ``"distribution"`` (``distance``
            between the counterfactual set and the real reference split: ``"l1_mean"``, ``"mmd"``, ``"fid"``,
            ``"kid"``; the feature ones use the oracle).
        settings: edit settings (steps, strength, guidance, seed, ...), the same for every δ.
    Returns:
        the report dict (``best_drift``, ``best_objective``, ``curve``, ``objective``, ``settings``, ``data``, ``notes``).
    """
    _threads(num_threads)
    t0 = time.perf_counter()
    notes: dict[str, str] = dict(_notes or {})
    pipe = _pipe or load_pipeline(checkpoint, device)
    orc = _oracle if _oracle is not None else (load_oracle(oracle, notes, device) if _pipe is None else None)
    grid = parse_drifts(drifts) if drifts is not None else drift_grid()
    if any(not isinstance(d, float) for d in grid):
        raise EvaluationError("a sweep grid holds numbers only")
    if objective not in ("counterfactual", "distribution"):
        raise EvaluationError(f"objective must be 'counterfactual' or 'distribution', got {objective!r}")
    if objective == "counterfactual" and orc is None:
        notes["objective"] = "no oracle: the counterfactual objective needs one; fell back to the distribution objective (l1_mean)"
        objective, distance = "distribution", "l1_mean"
    if objective == "distribution" and distance in ("mmd", "fid", "kid") and orc is None:
        notes["objective"] = f"no oracle for distance {distance!r} (oracle features); fell back to l1_mean"
        distance = "l1_mean"
    enc = pipe.encoder
    prep = pipe.model.meta.get("preprocessing", {})
    images, rows, ids = load_reference(manifest, prep, enc, split, limit=max_subjects)
    targets = intervention_targets(rows, enc, seed=seed)
    edit_settings = _settings(settings)
    from .evaluator import PipelineEditor, intervened_attributes

    calls = {"n": 0, "seconds": 0.0}

    def generate(d: float) -> torch.Tensor:
        ed = PipelineEditor(pipe, drift=d, **edit_settings)
        cf = ed(images, rows, targets)
        calls["n"] += ed.calls
        calls["seconds"] += ed.seconds
        _log(f"  sweep δ={d:g}: {ed.calls} edits in {ed.seconds:.0f} s", progress)
        return cf

    _log(f"sweep: {len(grid)} δ values x {images.shape[0]} images of split {split!r}", progress)
    if objective == "counterfactual":
        partial = [{n: t[n] for n in intervened_attributes(r, t, enc)} for r, t in zip(rows, targets)]
        result = search_drift_counterfactual(generate, images, partial, orc, enc, drifts=grid, lam=lam, proximity=proximity)
    else:
        real, _, _ = load_reference(manifest, prep, enc, reference_split, limit=max_reference)
        result = search_drift_distribution(generate, real, drifts=grid, distance=distance, feature_fn=orc)
        result["reference"] = {"split": reference_split, "n": int(real.shape[0])}
    notes.update({f"curve.{k}": v for k, v in result.pop("notes", {}).items()})
    report = {
        "kind": "drift_sweep",
        "best_drift": result["best_drift"],
        "best_objective": result["best_objective"],
        "objective": result["objective"],
        "curve": result["curve"],
        **{k: v for k, v in result.items() if k not in ("best_drift", "best_objective", "objective", "curve")},
        "settings": {**pipe.defaults, **edit_settings, "objective_kind": objective, "distance": distance if objective == "distribution" else None,
                     "lambda": lam, "proximity": proximity, "seed": edit_settings.get("seed", pipe.defaults.get("seed"))},
        "data": {"manifest": str(manifest), "split": split, "n_images": int(images.shape[0]), "image_ids": ids,
                 "targets": targets, "intervention_seed": seed},
        "checkpoint": str(checkpoint),
        "oracle": None if orc is None else str(oracle),
        "edits": calls["n"],
        "seconds_per_edit": round(calls["seconds"] / max(calls["n"], 1), 2),
        "seconds": round(time.perf_counter() - t0, 1),
        "notes": notes,
    }
    report["settings"].pop("drift", None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    with open(out / "report.json") as f:
        clean = json.load(f)
    atomic_write(out / "report.md", lambda tmp: open(tmp, "w").write(_sweep_markdown(clean)))
    plot_drift_curve(clean, out / "drift_curve.png", title=f"δ sweep ({split}, {images.shape[0]} images)")
    _log(f"sweep: best δ = {report['best_drift']:g}; wrote {out / 'report.json'} ({report['seconds']:.0f} s)", progress)
    return clean


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_DESCRIPTIONS = {
    "fid": "FID, counterfactuals vs real reference (oracle features) ↓",
    "kid": "KID (mean) ↓",
    "mmd": "MMD² (Gaussian kernel) ↓",
    "fid_reference": "FID, held-out REAL inputs vs the same reference (small-set floor)",
    "kid_reference": "KID of held-out real inputs (floor)",
    "mmd_reference": "MMD² of held-out real inputs (floor)",
    "ssim": "SSIM counterfactual vs input",
    "psnr": "PSNR counterfactual vs input (dB)",
    "l1": "L1 counterfactual vs input",
    "effectiveness": "oracle reads the intended target (success rate) ↑",
    "effectiveness_input": "… on the unchanged input (baseline)",
    "effectiveness_ground_truth": "… on the exact ground truth (oracle ceiling)",
    "composition": "null intervention ×1, L1 to original ↓",
    "reversibility": "change and change back, L1 to original ↓",
    "minimality": "CLD minimality score ↓",
    "gt_l1": "L1 to ground-truth counterfactual ↓",
    "gt_ssim": "SSIM to ground-truth counterfactual ↑",
    "gt_l1_input": "L1 unchanged input vs ground truth (do nothing)",
    "gt_ssim_input": "SSIM unchanged input vs ground truth",
    "gt_l1_reconstruction": "L1 autoencoder reconstruction vs ground truth (floor)",
    "gt_l1_latent_oracle": "L1 of x + D(E(gt)) − D(E(x)) vs ground truth: the best a perfect diffusion model reaches through this autoencoder",
    "gt_change_correlation": "corr(model change, gt − input) ↑",
    "gt_fraction_closer_than_input": "share of cfs closer to gt than the input",
}


def _eval_markdown(report: Mapping) -> str:
    drifts = list(report["by_drift"])
    main = str(float(report["main_drift"]))
    head = [f"δ={float(d):g}" + (" (main)" if d == main else "") for d in drifts]
    keys = list(report["metrics"])
    lines = ["# Counterfactual evaluation", "",
             f"Model `{report['checkpoint']}`; {report['data']['n_pairs']} ground-truth pairs of split "
             f"`{report['data']['split']}` ({report['data']['manifest']}); settings: "
             + ", ".join(f"{k}={v}" for k, v in report["settings"].items()) + ".", ""]
    if report.get("drift_search"):
        ds = report["drift_search"]
        lines += [f"Searched δ = **{ds['best_drift']:g}** ({ds.get('objective')}, split `{ds.get('data', {}).get('split', '?')}`).", ""]
    lines += ["| metric | " + " | ".join(head) + " | meaning |", "|---" * (len(head) + 2) + "|"]
    for k in keys:
        if k == "drift":
            continue
        vals = [_fmt(report["by_drift"][d]["metrics"].get(k)) for d in drifts]
        desc = _DESCRIPTIONS.get(k, f"null intervention ×{k[len('composition_k'):]}, L1 to original ↓" if k.startswith("composition_k") else "")
        lines.append(f"| {k} | " + " | ".join(vals) + f" | {desc} |")
    # per-attribute effectiveness of the main δ
    det = report["by_drift"][main]["details"]
    eff = det.get("effectiveness") or {}
    if eff.get("per_attribute"):
        lines += ["", f"Effectiveness per intervened attribute (δ={float(main):g}): "
                  + ", ".join(f"{n}: {v['success_rate']:.2f} (n={v['n']})" for n, v in eff["per_attribute"].items())]
    lines += volumes_markdown(report.get("volumes"))
    notes = report.get("notes") or {}
    if notes:
        lines += ["", "Notes:", ""] + [f"- `{k}`: {v}" for k, v in notes.items()]
    return "\n".join(lines) + "\n"


def _grid_rows(pairs: Sequence[Mapping], n: int) -> list[int]:
    """Up to ``n`` pair indices, taking the intervened attributes in turn (so the figure shows every kind of edit)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(",".join(p["intervened"]) or "none", []).append(i)
    order: list[int] = []
    while len(order) < min(n, len(pairs)):
        for g in groups.values():
            if g and len(order) < n:
                order.append(g.pop(0))
    return order


def run_evaluation(
    checkpoint: str | os.PathLike,
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    oracle: str | os.PathLike | None = None,
    split: str = "test",
    reference_split: str = "train",
    max_subjects: int | None = 20,
    axiom_subjects: int | None = 8,
    max_reference: int | None = 200,
    drifts: Any = (0.0, "searched"),
    main_drift: Any = None,
    sweep: Mapping[str, Any] | None = None,
    sweep_report: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    composition_steps: Sequence[int] = (1, 2),
    batch_size: int = 1,
    grid_rows: int = 4,
    device: str = "cpu",
    num_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a model's counterfactuals on the ground-truth pairs of ``split``; write the report into ``output_dir``.

    Args:
        checkpoint: the model (``ConditionalLDM`` checkpoint; attributes and preprocessing come from it).
        manifest: CSV with ``image_id, path, split, counterfactual_of`` + attribute columns.
        oracle: ``oracle.pt`` path (absent -> oracle-based metrics null with a note).
        max_subjects: first N factual test images with a partner; ``axiom_subjects``: how many of them also get
            the composition / reversibility edits.
        max_reference: at most this many real images of ``reference_split`` (realism and minimality reference).
        drifts: δ values; ``"searched"`` = ``best_drift`` of ``sweep_report`` when that file exists, else of a sweep
            run first (:func:`run_sweep` with ``sweep`` kwargs, written to ``output_dir/sweep``).
        main_drift: the δ whose numbers form the top-level ``metrics`` (default: the searched δ when listed, else the
            first).
        settings: edit settings for every δ (``num_inference_steps``, ``strength``, ``guidance``, ``seed``, ...).
        composition_steps: ``k`` values of the composition test.

    Returns:
        the report as written to ``report.json``.
    """
    _threads(num_threads)
    t0 = time.perf_counter()
    out = Path(output_dir)
    notes: dict[str, str] = {}
    pipe = load_pipeline(checkpoint, device)
    orc = load_oracle(oracle, notes, device)
    enc = pipe.encoder
    prep = pipe.model.meta.get("preprocessing", {})
    edit_settings = _settings(settings)
    wanted = parse_drifts(list(drifts) if not isinstance(drifts, str) else drifts)
    # the data first: a bad manifest fails before any δ search
    pairs = load_counterfactual_pairs(manifest, prep, enc, split, max_subjects)
    _log(f"evaluate: {len(pairs)} ground-truth pairs of split {split!r} loaded", progress)
    vol_labels = load_pair_labels(manifest, pairs, notes)  # None when the manifest has no label maps
    drift_search = None
    if "searched" in wanted:
        if sweep_report and Path(sweep_report).is_file():
            with open(sweep_report) as f:
                drift_search = json.load(f)
            if "best_drift" not in drift_search:
                raise EvaluationError(f"sweep report '{sweep_report}' has no 'best_drift'")
            drift_search["source"] = str(sweep_report)
        else:
            if sweep_report:
                notes["drift_search"] = f"sweep report '{sweep_report}' not found; ran the sweep"
            sw = {"settings": edit_settings, **dict(sweep or {})}
            drift_search = run_sweep(checkpoint, manifest, out / "sweep", oracle=oracle, device=device, progress=progress,
                                     _pipe=pipe, _oracle=orc, **sw)
            drift_search["source"] = str(out / "sweep" / "report.json")
    searched = None if drift_search is None else float(drift_search["best_drift"])
    values: list[float] = []
    for d in wanted:
        v = searched if d == "searched" else float(d)
        if v not in values:
            values.append(v)
    if main_drift is None or main_drift == "searched":
        main = searched if searched is not None else values[0]
    else:
        main = float(main_drift)
        if main not in values:
            values.append(main)
    reference = _reference(manifest, pipe, orc, reference_split, max_reference, notes, progress)
    _log(f"evaluate: δ = {', '.join(f'{v:g}' for v in values)} (main {main:g}); {len(pairs)} pairs, "
         f"{min(len(pairs), axiom_subjects if axiom_subjects is not None else len(pairs))} with composition/reversibility", progress)
    res = evaluate_counterfactuals(pipe, pairs, values, oracle=orc, reference=reference, settings=edit_settings,
                                   composition_steps=composition_steps, axiom_subjects=axiom_subjects,
                                   batch_size=batch_size, device=device, progress=progress)
    by_drift = res["by_drift"]
    mkey = str(float(main))
    if vol_labels:
        for key, col in res["collected"].items():
            by_drift[key]["volumes"] = evaluation_volumes(col, vol_labels)
    metrics = dict(by_drift[mkey]["metrics"])
    for k, v in by_drift[mkey]["notes"].items():
        notes.setdefault(k, v)
    missing = [k for k in FLAT_METRICS if k not in metrics]
    if missing:  # a bug, not a data problem
        raise RuntimeError(f"evaluation produced no {missing}")
    report = {
        "kind": "counterfactual_evaluation",
        "main_drift": main,
        "metrics": metrics,
        "drifts": values,
        "by_drift": by_drift,
        "drift_search": drift_search,
        "volumes": by_drift[mkey].get("volumes"),
        "settings": {k: v for k, v in {**pipe.defaults, **edit_settings}.items() if k != "drift"},
        "composition_steps": list(composition_steps),
        "data": {"manifest": str(manifest), "split": split, "n_pairs": len(pairs),
                 "pairs": [{"image_id": p["image_id"], "ground_truth": p["gt_id"], "source": p["source"],
                            "target": p["target"], "intervened": p["intervened"]} for p in pairs],
                 "reference_split": reference_split, "n_reference": None if reference is None else int(reference["images"].shape[0]),
                 "spatial_shape": list(pairs[0]["image"].shape[1:])},
        "checkpoint": str(checkpoint),
        "oracle": None if orc is None else {"path": str(oracle), "feature_network": "oracle-penultimate",
                                            "feature_dim": orc.feature_dim},
        "definitions": {k: v for k, v in _DESCRIPTIONS.items()},
        "seconds": None,
        "notes": notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    rows_shown = _grid_rows(pairs, grid_rows)
    titles = [f"{pairs[i]['image_id']}: " + ", ".join(
        f"{n} {_fmt(pairs[i]['source'][n])}→{_fmt(pairs[i]['target'][n])}" for n in pairs[i]["intervened"]) for i in rows_shown]
    for key, col in res["collected"].items():
        name = "counterfactuals.png" if key == mkey else f"counterfactuals_drift_{float(key):g}.png"
        files[f"grid_{float(key):g}"] = str(plot_counterfactual_grid(
            col["input"][rows_shown], col["counterfactual"][rows_shown], out / name, col["ground_truth"][rows_shown],
            max_rows=grid_rows, titles=titles))
    report["grid_rows"] = [pairs[i]["image_id"] for i in rows_shown]
    if drift_search is not None:
        files["drift_curve"] = str(plot_drift_curve(drift_search, out / "drift_curve.png",
                                                    title=f"δ search (best δ = {drift_search['best_drift']:g})"))
    report["files"] = {k: os.path.basename(v) for k, v in files.items()}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "report.json", report)
    with open(out / "report.json") as f:
        clean = json.load(f)
    atomic_write(out / "report.md", lambda tmp: open(tmp, "w").write(_eval_markdown(clean)))
    _log(f"evaluate: wrote {out / 'report.json'} ({report['seconds']:.0f} s)", progress)
    return clean
