"""The δ sweep: a grid search for the Latent Drifting δ on held-out images, written as a report folder.

Default: the validation split (no test image picks its own δ), one seeded single-attribute intervention per image
(:func:`~monai_ld.evaluation.intervention_targets`). Objective ``"counterfactual"``
(:func:`~monai_ld.evaluation.search_drift_counterfactual`, needs the oracle) or ``"distribution"``
(:func:`~monai_ld.evaluation.search_drift_distribution` against the real reference split). Writes ``report.json``
(``best_drift``, ``curve``), ``report.md`` and ``drift_curve.png``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluation import (
    EvaluationError,
    PipelineEditor,
    drift_grid,
    intervention_targets,
    load_reference,
    parse_drifts,
    plot_drift_curve,
    search_drift_counterfactual,
    search_drift_distribution,
    write_json,
)
from ..evaluation.pairs import intervened_attributes
from ..evaluation.summaries import sweep_markdown
from ..utils import atomic_write, set_threads
from .common import Job, edit_settings, open_job

__all__ = ["SweepSpec", "run_sweep", "sweep_job"]


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep edits and how it picks δ: the ``sweep`` block of ``configs/evaluate.json`` plus the edit settings
    shared by every δ. See :func:`run_sweep` for the fields."""

    split: str = "val"
    drifts: Any = None
    max_subjects: int | None = 6
    objective: str = "counterfactual"
    distance: str = "l1_mean"
    lam: float = 1.0
    proximity: str = "l1"
    reference_split: str = "train"
    max_reference: int | None = 200
    seed: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)


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
) -> dict:
    """Grid search for δ on held-out images; writes ``report.json`` / ``report.md`` / ``drift_curve.png``.

    Args:
        split: the split whose factual images are edited (default ``"val"``: no test image picks its own δ).
        drifts: grid (list, ``"a:b:step"`` or None = −0.2…0.2 step 0.05).
        max_subjects: first N factual images of ``split``.
        objective: ``"counterfactual"`` (``lam · oracle loss + proximity``) or ``"distribution"`` (``distance``
            between the counterfactual set and the real reference split: ``"l1_mean"``, ``"mmd"``, ``"fid"``,
            ``"kid"``; the feature ones use the oracle).
        settings: edit settings (num_inference_steps, strength, guidance_scale, seed, ...), the same for every δ.
    Returns:
        the report dict (``best_drift``, ``best_objective``, ``curve``, ``objective``, ``settings``, ``data``, ``notes``).
    """
    set_threads(num_threads)
    spec = SweepSpec(split, drifts, max_subjects, objective, distance, lam, proximity, reference_split, max_reference,
                     seed, edit_settings(settings))
    notes: dict[str, str] = {}
    job = open_job(checkpoint, oracle, notes, device, progress)
    return sweep_job(job, manifest, output_dir, spec, notes)


def _objective(spec: SweepSpec, has_oracle: bool, notes: dict) -> tuple[str, str]:
    """``(objective, distance)``: the spec's, or the l1_mean distribution distance when the oracle they need is absent."""
    objective, distance = spec.objective, spec.distance
    if objective not in ("counterfactual", "distribution"):
        raise EvaluationError(f"objective must be 'counterfactual' or 'distribution', got {objective!r}")
    if objective == "counterfactual" and not has_oracle:
        notes["objective"] = "no oracle: the counterfactual objective needs one; fell back to the distribution objective (l1_mean)"
        objective, distance = "distribution", "l1_mean"
    if objective == "distribution" and distance in ("mmd", "fid", "kid") and not has_oracle:
        notes["objective"] = f"no oracle for distance {distance!r} (oracle features); fell back to l1_mean"
        distance = "l1_mean"
    return objective, distance


def sweep_job(job: Job, manifest: str | os.PathLike, output_dir: str | os.PathLike, spec: SweepSpec,
          notes: dict | None = None) -> dict:
    """:func:`run_sweep` on an already loaded model (an evaluation runs its sweep this way); ``notes`` start the
    report's notes."""
    t0 = time.perf_counter()
    notes = dict(notes or {})
    orc, enc = job.oracle, job.encoder
    grid = parse_drifts(spec.drifts) if spec.drifts is not None else drift_grid()
    if any(not isinstance(d, float) for d in grid):
        raise EvaluationError("a sweep grid holds numbers only")
    objective, distance = _objective(spec, orc is not None, notes)
    images, rows, ids = load_reference(manifest, job.preprocessing, enc, spec.split, limit=spec.max_subjects)
    targets = intervention_targets(rows, enc, seed=spec.seed)
    settings = dict(spec.settings)
    calls = {"n": 0, "seconds": 0.0}

    def generate(d: float) -> torch.Tensor:
        ed = PipelineEditor(job.pipe, drift=d, **settings)
        cf = ed(images, rows, targets)
        calls["n"] += ed.calls
        calls["seconds"] += ed.seconds
        job.log(f"  sweep δ={d:g}: {ed.calls} edits in {ed.seconds:.0f} s")
        return cf

    job.log(f"sweep: {len(grid)} δ values x {images.shape[0]} images of split {spec.split!r}")
    if objective == "counterfactual":
        partial = [{n: t[n] for n in intervened_attributes(r, t, enc)} for r, t in zip(rows, targets)]
        result = search_drift_counterfactual(generate, images, partial, orc, enc, drifts=grid, lam=spec.lam,
                                             proximity=spec.proximity)
    else:
        real, _, _ = load_reference(manifest, job.preprocessing, enc, spec.reference_split, limit=spec.max_reference)
        result = search_drift_distribution(generate, real, drifts=grid, distance=distance, feature_fn=orc)
        result["reference"] = {"split": spec.reference_split, "n": int(real.shape[0])}
    notes.update({f"curve.{k}": v for k, v in result.pop("notes", {}).items()})
    report = {
        "kind": "drift_sweep",
        "best_drift": result["best_drift"],
        "best_objective": result["best_objective"],
        "objective": result["objective"],
        "curve": result["curve"],
        **{k: v for k, v in result.items() if k not in ("best_drift", "best_objective", "objective", "curve")},
        "settings": {**job.pipe.settings.update(settings).asdict(), "objective_kind": objective,
                     "distance": distance if objective == "distribution" else None, "lambda": spec.lam,
                     "proximity": spec.proximity},
        "data": {"manifest": str(manifest), "split": spec.split, "n_images": int(images.shape[0]), "image_ids": ids,
                 "targets": targets, "intervention_seed": spec.seed},
        "checkpoint": job.checkpoint,
        "oracle": None if orc is None else job.oracle_path,
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
    atomic_write(out / "report.md", lambda tmp: open(tmp, "w").write(sweep_markdown(clean)))
    plot_drift_curve(clean, out / "drift_curve.png", title=f"δ sweep ({spec.split}, {images.shape[0]} images)")
    job.log(f"sweep: best δ = {report['best_drift']:g}; wrote {out / 'report.json'} ({report['seconds']:.0f} s)")
    return clean
