"""Evaluation reports: JSON (every number), a Markdown table, PNG figures. All writes are atomic.

- :func:`write_json` — nested results to JSON; tensors/arrays become lists, NaN/inf become ``null`` and a
  ``notes`` entry records where and why (existing ``notes`` dicts are kept).
- :func:`markdown_table` / :func:`write_markdown` — one ``| metric | value |`` row per scalar (per-sample lists and
  curves are left to the JSON).
- :func:`plot_drift_curve` — objective vs δ (and its components), best δ marked.
- :func:`plot_counterfactual_grid` — rows of original / counterfactual / difference / ground truth; 3D volumes show
  their middle slice along ``slice_axis``.
- :func:`write_report` — all of the above into one folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ._checks import EvaluationError, atomic_write, check_images  # noqa: E402

__all__ = [
    "to_jsonable",
    "write_json",
    "markdown_table",
    "write_markdown",
    "plot_drift_curve",
    "plot_counterfactual_grid",
    "write_report",
]


def to_jsonable(obj: Any, notes: dict | None = None, path: str = "") -> Any:
    """Plain-JSON copy of ``obj``; non-finite floats -> None, recorded in ``notes[path]``."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        obj = obj.tolist() if obj.ndim else obj.item()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, notes, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, notes, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if notes is not None:
            notes[path] = f"value was {obj} (not representable in JSON)"
        return None
    return str(obj)


def write_json(path: str | os.PathLike, results: Mapping, notes: Mapping[str, str] | None = None) -> str:
    """Write ``results`` as indented JSON with a top-level ``notes`` dict (given notes + non-finite values)."""
    auto: dict = {}
    data = to_jsonable(results, auto)
    merged = dict(data.get("notes", {}) if isinstance(data.get("notes"), Mapping) else {})
    merged.update(dict(notes or {}))
    merged.update({k: v for k, v in auto.items() if k not in merged})
    data["notes"] = merged
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)
    return atomic_write(path, lambda tmp: open(tmp, "w").write(text + "\n"))


def _scalars(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if k in ("per_sample", "curve", "notes", "history"):
                continue
            rows += _scalars(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        rows.append((prefix, obj))
    elif isinstance(obj, torch.Tensor) and obj.numel() == 1:
        rows.append((prefix, float(obj)))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def markdown_table(results: Mapping, title: str | None = None) -> str:
    """Markdown ``| metric | value |`` table of every scalar in ``results`` (dotted paths), then the notes."""
    lines = [f"# {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in _scalars(results)]
    notes = results.get("notes") if isinstance(results, Mapping) else None
    if notes:
        lines += ["", "Notes:", ""] + [f"- `{k}`: {v}" for k, v in _flat_notes(notes)]
    return "\n".join(lines) + "\n"


def _flat_notes(notes: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(notes, Mapping):
        out = []
        for k, v in notes.items():
            out += _flat_notes(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, str(notes))]


def write_markdown(path: str | os.PathLike, results: Mapping, title: str | None = None) -> str:
    text = markdown_table(results, title)
    return atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def _save_fig(fig, path) -> str:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_drift_curve(result: Mapping, path: str | os.PathLike, title: str | None = None) -> str:
    """PNG of a drift search ``result`` (from :mod:`~monai_ld.evaluation.drift_search`): objective vs δ, with
    numeric components on the same axes (dashed) and the best δ marked."""
    curve = result.get("curve")
    if not curve:
        raise EvaluationError("plot_drift_curve: the result has no 'curve'")
    drifts = [e["drift"] for e in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    obj = [np.nan if e.get("objective") is None else e["objective"] for e in curve]
    ax.plot(drifts, obj, "o-", color="k", label="objective")
    comps = [k for k in curve[0] if k not in ("drift", "objective") and isinstance(curve[0][k], (int, float))]
    per_attr = [k for k in comps if k.startswith("oracle_loss/")]
    if len(per_attr) == 1 and "oracle_loss" in comps:  # a single attribute: identical to oracle_loss
        comps.remove(per_attr[0])
    for k in comps:
        ax.plot(drifts, [np.nan if e.get(k) is None else e[k] for e in curve], "--", marker=".", label=k)
    if result.get("best_drift") is not None:
        ax.axvline(result["best_drift"], color="tab:red", lw=1)
        ax.plot([result["best_drift"]], [result["best_objective"]], "*", color="tab:red", ms=14, label=f"best δ = {result['best_drift']:g}")
    ax.set_xlabel("drift δ")
    ax.set_ylabel(str(result.get("objective", "objective")) if isinstance(result.get("objective"), str) else "objective")
    ax.set_title(title or "Latent Drifting δ search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_fig(fig, path)


def _slice2d(x: torch.Tensor, slice_axis: int) -> np.ndarray:
    """``(C, *spatial)`` -> 2D array (first channel; middle slice along ``slice_axis`` for 3D)."""
    img = x[0]
    if img.ndim == 3:
        img = img.select(slice_axis if slice_axis >= 0 else img.ndim + slice_axis, img.shape[slice_axis] // 2)
    return img.detach().float().cpu().numpy().T  # (W, H): rows = second axis, as MONAI/ITK images display


def plot_counterfactual_grid(
    originals: torch.Tensor,
    counterfactuals: torch.Tensor,
    path: str | os.PathLike,
    ground_truth: torch.Tensor | None = None,
    max_rows: int = 4,
    slice_axis: int = -1,
    titles: Sequence[str] | None = None,
) -> str:
    """PNG grid, one row per sample: original | counterfactual | difference (cf − original) [| ground truth].

    Args:
        originals, counterfactuals, ground_truth: ``(B, C, H, W)`` or ``(B, C, H, W, D)``; the first channel is
            shown; 3D shows the middle slice along ``slice_axis`` (a spatial axis index, default the last).
        max_rows: at most this many samples.
        titles: optional per-row labels (e.g. the intervention).
    """
    o, c = check_images(originals, "originals"), check_images(counterfactuals, "counterfactuals")
    if o.shape != c.shape:
        raise EvaluationError(f"originals {tuple(o.shape)} and counterfactuals {tuple(c.shape)} differ")
    if ground_truth is not None:
        g = check_images(ground_truth, "ground_truth")
        if g.shape != o.shape:
            raise EvaluationError(f"ground truth {tuple(g.shape)} and originals {tuple(o.shape)} differ")
    n = min(max_rows, o.shape[0])
    cols = 4 if ground_truth is not None else 3
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 2.6 * n), squeeze=False)
    vmin, vmax = float(min(o.min(), c.min())), float(max(o.max(), c.max()))
    diff_lim = float((c - o).abs().max()) or 1e-6
    for i in range(n):
        panels = [
            ("original", _slice2d(o[i], slice_axis), "gray", vmin, vmax),
            ("counterfactual", _slice2d(c[i], slice_axis), "gray", vmin, vmax),
            ("difference", _slice2d(c[i] - o[i], slice_axis), "RdBu_r", -diff_lim, diff_lim),
        ]
        if ground_truth is not None:
            panels.append(("ground truth", _slice2d(g[i], slice_axis), "gray", vmin, vmax))
        for j, (name, img, cmap, lo, hi) in enumerate(panels):
            ax = axes[i, j]
            im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, origin="lower")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0 and titles is not None and i < len(titles):
                ax.set_ylabel(str(titles[i]), fontsize=8)
            if name == "difference":
                cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
                cb.ax.tick_params(labelsize=7)
    return _save_fig(fig, path)


def write_report(
    folder: str | os.PathLike,
    results: Mapping,
    drift_result: Mapping | None = None,
    originals: torch.Tensor | None = None,
    counterfactuals: torch.Tensor | None = None,
    ground_truth: torch.Tensor | None = None,
    title: str = "Counterfactual evaluation",
) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` and (when given the inputs) ``drift_curve.png`` and
    ``counterfactuals.png`` into ``folder``; returns ``{kind: path}``."""
    os.makedirs(folder, exist_ok=True)
    full = dict(results)
    if drift_result is not None:
        full.setdefault("drift_search", drift_result)
    paths = {"json": write_json(os.path.join(folder, "report.json"), full)}
    with open(paths["json"]) as f:
        clean = json.load(f)
    paths["markdown"] = write_markdown(os.path.join(folder, "report.md"), clean, title)
    if drift_result is not None:
        paths["drift_curve"] = plot_drift_curve(drift_result, os.path.join(folder, "drift_curve.png"))
    if originals is not None and counterfactuals is not None:
        paths["grid"] = plot_counterfactual_grid(originals, counterfactuals, os.path.join(folder, "counterfactuals.png"), ground_truth)
    return paths
