"""The counterfactual evaluation of a trained model, written as a report folder.

:func:`~monai_ld.evaluation.evaluate_counterfactuals` over the ground-truth pairs of the test split for a list of δ
(numbers and/or ``"searched"``: the ``best_drift`` of a sweep report, or of a sweep run first); writes
``report.json`` (top-level ``metrics`` for the main δ, ``by_drift`` for all), ``report.md``, ``counterfactuals.png``
(main δ), ``counterfactuals_drift_<δ>.png`` (every δ) and ``drift_curve.png`` (when a sweep ran or was loaded).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..evaluation import (
    EvaluationError,
    evaluate_counterfactuals,
    load_counterfactual_pairs,
    parse_drifts,
    plot_counterfactual_grid,
    plot_drift_curve,
    write_json,
)
from ..evaluation.set_metrics import FLAT_METRICS
from ..evaluation.summaries import METRIC_DESCRIPTIONS, evaluation_markdown, format_value
from ..evaluation.volumes import evaluation_volumes, load_pair_labels
from ..utils import atomic_write, set_threads
from .common import Job, edit_settings, open_job, reference_set
from .sweep import SweepSpec, sweep_job

__all__ = ["run_evaluation"]


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
            run first (:func:`~.sweep.run_sweep` with ``sweep`` kwargs, written to ``output_dir/sweep``).
        main_drift: the δ whose numbers form the top-level ``metrics`` (default: the searched δ when listed, else the
            first).
        settings: edit settings for every δ (``num_inference_steps``, ``strength``, ``guidance_scale``, ``seed``, ...).
        composition_steps: ``k`` values of the composition test.

    Returns:
        the report as written to ``report.json``.
    """
    set_threads(num_threads)
    t0 = time.perf_counter()
    out = Path(output_dir)
    notes: dict[str, str] = {}
    job = open_job(checkpoint, oracle, notes, device, progress)
    settings = edit_settings(settings)
    wanted = parse_drifts(list(drifts) if not isinstance(drifts, str) else drifts)
    # the data first: a bad manifest fails before any δ search
    pairs = load_counterfactual_pairs(manifest, job.preprocessing, job.encoder, split, max_subjects)
    job.log(f"evaluate: {len(pairs)} ground-truth pairs of split {split!r} loaded")
    vol_labels = load_pair_labels(manifest, pairs, notes)  # None when the manifest has no label maps
    drift_search = None
    if "searched" in wanted:
        sweep_spec = {"settings": settings, **dict(sweep or {})}
        sweep_spec["settings"] = edit_settings(sweep_spec["settings"])
        drift_search = _drift_search(job, manifest, out, SweepSpec(**sweep_spec), sweep_report, notes)
    values, main = _drift_values(wanted, None if drift_search is None else float(drift_search["best_drift"]), main_drift)
    reference = reference_set(job, manifest, reference_split, max_reference)
    n_axiom = min(len(pairs), axiom_subjects if axiom_subjects is not None else len(pairs))
    job.log(f"evaluate: δ = {', '.join(f'{v:g}' for v in values)} (main {main:g}); {len(pairs)} pairs, "
            f"{n_axiom} with composition/reversibility")
    res = evaluate_counterfactuals(job.pipe, pairs, values, oracle=job.oracle, reference=reference, settings=settings,
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
        "settings": {k: v for k, v in job.pipe.settings.update(settings).asdict().items() if k != "drift"},
        "composition_steps": list(composition_steps),
        "data": {"manifest": str(manifest), "split": split, "n_pairs": len(pairs),
                 "pairs": [{"image_id": p["image_id"], "ground_truth": p["gt_id"], "source": p["source"],
                            "target": p["target"], "intervened": p["intervened"]} for p in pairs],
                 "reference_split": reference_split,
                 "n_reference": None if reference is None else int(reference["images"].shape[0]),
                 "spatial_shape": list(pairs[0]["image"].shape[1:])},
        "checkpoint": job.checkpoint,
        "oracle": None if job.oracle is None else {"path": job.oracle_path, "feature_network": "oracle-penultimate",
                                                   "feature_dim": job.oracle.feature_dim},
        "definitions": dict(METRIC_DESCRIPTIONS),
        "seconds": None,
        "notes": notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    shown = _grid_rows(pairs, grid_rows)
    files = _figures(out, pairs, shown, res["collected"], mkey, grid_rows, drift_search)
    report["grid_rows"] = [pairs[i]["image_id"] for i in shown]
    report["files"] = {k: os.path.basename(v) for k, v in files.items()}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "report.json", report)
    with open(out / "report.json") as f:
        clean = json.load(f)
    atomic_write(out / "report.md", lambda tmp: open(tmp, "w").write(evaluation_markdown(clean)))
    job.log(f"evaluate: wrote {out / 'report.json'} ({report['seconds']:.0f} s)")
    return clean


def _drift_search(job: Job, manifest: str | os.PathLike, out: Path, spec: SweepSpec,
                  sweep_report: str | os.PathLike | None, notes: dict) -> dict:
    """The sweep behind ``"searched"``: read from ``sweep_report`` when that file exists, else run into ``out/sweep``."""
    if sweep_report and Path(sweep_report).is_file():
        with open(sweep_report) as f:
            found = json.load(f)
        if "best_drift" not in found:
            raise EvaluationError(f"sweep report '{sweep_report}' has no 'best_drift'")
        return {**found, "source": str(sweep_report)}
    if sweep_report:
        notes["drift_search"] = f"sweep report '{sweep_report}' not found; ran the sweep"
    return {**sweep_job(job, manifest, out / "sweep", spec), "source": str(out / "sweep" / "report.json")}


def _drift_values(wanted: Sequence, searched: float | None, main_drift: Any) -> tuple[list[float], float]:
    """The δ values to evaluate (``"searched"`` replaced, duplicates dropped) and the main one."""
    values: list[float] = []
    for d in wanted:
        v = searched if d == "searched" else float(d)
        if v not in values:
            values.append(v)
    if main_drift is None or main_drift == "searched":
        return values, searched if searched is not None else values[0]
    main = float(main_drift)
    if main not in values:
        values.append(main)
    return values, main


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


def _figures(out: Path, pairs: Sequence[Mapping], shown: list[int], collected: Mapping[str, Mapping], main_key: str,
             grid_rows: int, drift_search: Mapping | None) -> dict[str, str]:
    """One counterfactual grid per δ (the main δ's is ``counterfactuals.png``) and the δ curve when there was a search."""
    files = {}
    titles = [f"{pairs[i]['image_id']}: " + ", ".join(
        f"{n} {format_value(pairs[i]['source'][n])}→{format_value(pairs[i]['target'][n])}" for n in pairs[i]["intervened"])
        for i in shown]
    for key, col in collected.items():
        name = "counterfactuals.png" if key == main_key else f"counterfactuals_drift_{float(key):g}.png"
        files[f"grid_{float(key):g}"] = str(plot_counterfactual_grid(
            col["input"][shown], col["counterfactual"][shown], out / name, col["ground_truth"][shown],
            max_rows=grid_rows, titles=titles))
    if drift_search is not None:
        files["drift_curve"] = str(plot_drift_curve(drift_search, out / "drift_curve.png",
                                                    title=f"δ search (best δ = {drift_search['best_drift']:g})"))
    return files
