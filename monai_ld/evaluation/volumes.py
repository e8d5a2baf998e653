"""Regional volume change measured from images, as brain-ageing studies report it (ventricles, hippocampi, amygdalae).

A counterfactual "aged" or "AD" brain should show larger lateral ventricles and smaller medial-temporal structures.
These functions measure that from the IMAGES, inside regions taken from the input's label map (the phantom's, or a
user segmentation), in the spirit of the boundary shift integral (Freeborough & Fox 1997): the change of a partial-
volume fraction, summed over a region around the structure's boundary, with intensity levels estimated from the
image itself so that per-subject contrast (gamma), bias field and noise do not enter.

- ventricles: CSF fraction ``(W - I) / (W - C)`` inside the ventricles grown by ``ventricle_margin_mm`` (each voxel
  given to its nearest structure). ``C`` = median of the input's ventricle voxels, ``W`` = median of the white-matter
  voxels in that region. Enlargement pushes the periventricular layers outward, so over the whole region the
  intensity lost is ``ΔV (W - C)`` whatever layers (caudate GM, WM) moved in between: one white-matter normaliser.
- hippocampus / amygdala: tissue fraction ``(I - C) / (T_label - C)``, where ``T_label`` is the input's median level of
  each voxel's own tissue class near the medial temporal lobe (tissue lost to atrophy becomes CSF in place), weighted
  by a partial-volume membership ``min(1, gain * G_sigma * mask)`` inside the structure grown by ``mtl_margin_mm``.
  Built for atrophy (the regions are the input's): regrowth into a CSF rim (a younger / healthier counterfactual) is
  read less exactly (reversed phantom pairs: hippocampus median error 20-27 %, slope 0.93-1.23).

:func:`volume_change` sums the fraction differences unclipped (linear, so noise and partial volumes cancel between two
images of the same grid); :func:`structure_volumes` reports the clipped fractions in ml (absolute numbers include
what lies in the grown region, so compare them between images, not with label-map volumes). The defaults were set
on phantom seeds 1000-1031; ``benchmarks/volume_check.py`` measures the result on other seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from .pairs import manifest_path, read_manifest

__all__ = [
    "STRUCTURES", "TISSUE_LABELS", "structure_regions", "intensity_levels", "structure_volumes", "volume_change",
    "label_volume_change", "match_intensity", "volume_agreement", "pair_volume_changes", "summarize_volume_changes",
]

#: structure -> label ids (the brain phantom's :data:`~monai_ld.data.phantoms.brain.BRAIN_LABELS`)
STRUCTURES: dict[str, tuple[int, ...]] = {"ventricles": (4, 5), "hippocampus": (6, 7), "amygdala": (8, 9)}
TISSUE_LABELS: dict[str, int] = {"csf": 1, "gm": 2, "wm": 3}
#: the manifest's label-map volume columns (``PhantomRender.measurements``) of each structure
MANIFEST_COLUMNS = {"ventricles": "ventricle_ml", "hippocampus": "hippocampus_ml", "amygdala": "amygdala_ml"}


def _np(a: Any) -> np.ndarray:
    """``(1, *spatial)`` or ``spatial`` tensor/array -> float64 ``spatial`` array."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return a[0].astype(np.float64) if a.ndim == 4 else a.astype(np.float64)


def _spacing(spacing: float | Sequence[float]) -> np.ndarray:
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if np.any(sp <= 0):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return sp


def structure_regions(labels: np.ndarray, spacing: float | Sequence[float] = 1.0,
                      structures: Mapping[str, Sequence[int]] = STRUCTURES, ventricle_margin_mm: float = 9.0,
                      mtl_margin_mm: float = 6.0) -> dict[str, np.ndarray]:
    """Boolean ``spatial`` regions: each structure grown by its margin (mm), inside the brain (label > 0), every voxel
    given to its nearest structure so that regions do not overlap. ``"ventricles"`` gets ``ventricle_margin_mm``,
    the others ``mtl_margin_mm``."""
    lab = np.asarray(labels)
    sp = _spacing(spacing)
    names = [n for n in structures if np.isin(lab, structures[n]).any()]
    if not names:
        return {}
    dist = np.stack([ndi.distance_transform_edt(~np.isin(lab, structures[n]), sampling=sp) for n in names])
    nearest = dist.argmin(0)
    brain = _brain(lab, structures)
    return {n: (dist[i] <= (ventricle_margin_mm if n == "ventricles" else mtl_margin_mm)) & (nearest == i) & brain
            for i, n in enumerate(names)}


def _brain(labels: np.ndarray, structures: Mapping[str, Sequence[int]], image: np.ndarray | None = None) -> np.ndarray:
    """``labels > 0``; a segmentation of the structures alone does not say where the brain is: then the image's
    foreground (> 10 % of its 99th percentile), or everywhere."""
    ids = [i for v in structures.values() for i in v]
    if np.isin(labels[labels > 0], ids, invert=True).any():
        return labels > 0
    if image is None:
        return np.ones(labels.shape, bool)
    return image > 0.1 * np.percentile(image, 99)


def _median(x: np.ndarray, mask: np.ndarray, fallback: float) -> float:
    return float(np.median(x[mask])) if mask.sum() >= 10 else float(fallback)


def intensity_levels(image: Any, labels: np.ndarray, spacing: float | Sequence[float] = 1.0,
                     structures: Mapping[str, Sequence[int]] = STRUCTURES, tissue_labels: Mapping[str, int] = TISSUE_LABELS,
                     near_mm: float = 9.0) -> dict[str, Any]:
    """Intensity levels of ``image`` ``(1, *spatial)``, estimated inside the brain from its label map.

    Returns ``{"csf": ventricle median, "wm_ventricles": WM median near the ventricles, "wm": WM median near the medial
    temporal lobe, "per_label": {label id: median near the medial temporal lobe}}``. Local medians absorb a smooth
    bias field; classes with < 10 voxels fall back to brain-wide percentiles (a user segmentation of the structures
    alone still works).
    """
    x, lab = _np(image), np.asarray(labels)
    sp = _spacing(spacing)
    brain = _brain(lab, structures, x)
    if brain.sum() < 10:
        raise ValueError("the label map marks fewer than 10 brain voxels")
    lo, hi = np.percentile(x[brain], [10, 85])
    vent = np.isin(lab, structures.get("ventricles", ()))
    csf = _median(x, vent, lo)
    wm_id = tissue_labels.get("wm", -1)
    near_vent = ndi.distance_transform_edt(~vent, sampling=sp) <= near_mm if vent.any() else brain
    mtl_ids = [i for n, ids in structures.items() if n != "ventricles" for i in ids]
    mtl = np.isin(lab, mtl_ids)
    near_mtl = ndi.distance_transform_edt(~mtl, sampling=sp) <= near_mm if mtl.any() else brain
    wm_v = _median(x, near_vent & (lab == wm_id), _median(x, lab == wm_id, hi))
    wm_m = _median(x, near_mtl & (lab == wm_id), _median(x, lab == wm_id, hi))
    per_label = {int(v): _median(x, near_mtl & (lab == v), _median(x, lab == v, hi)) for v in np.unique(lab[brain])}
    for i in structures.get("ventricles", ()):
        per_label[int(i)] = csf
    return {"csf": csf, "wm_ventricles": wm_v, "wm": wm_m, "per_label": per_label}


def _fractions(image: np.ndarray, labels: np.ndarray, regions: Mapping[str, np.ndarray], levels: Mapping[str, Any],
               structures: Mapping[str, Sequence[int]], sigma_vox: float, gain: float) -> dict[str, tuple]:
    """Per structure ``(weights, fraction)`` over its region: the structure's volume share of each voxel, unclipped."""
    c = levels["csf"]
    out = {}
    for name, reg in regions.items():
        if name == "ventricles":
            den = max(levels["wm_ventricles"] - c, 1e-6)
            out[name] = (np.ones(int(reg.sum())), (levels["wm_ventricles"] - image[reg]) / den)
            continue
        lut = np.zeros(int(labels.max()) + 1)
        for k, v in levels["per_label"].items():
            lut[k] = v
        floor = 0.25 * max(levels["wm"] - c, 1e-6)  # CSF-labelled voxels: no division by ~0
        den = np.maximum(lut[labels[reg]] - c, floor)
        member = np.isin(labels, structures[name]).astype(np.float64)
        w = np.clip(gain * ndi.gaussian_filter(member, sigma_vox), 0.0, 1.0) if sigma_vox > 0 else np.ones_like(member)
        out[name] = (w[reg], (image[reg] - c) / den)
    return out


_DEFAULTS = {"ventricle_margin_mm": 9.0, "mtl_margin_mm": 6.0, "sigma_vox": 0.7, "gain": 3.0}


def _prepare(image, labels, spacing, structures, regions, levels, opts):
    lab = np.asarray(labels).astype(np.int64)
    if lab.ndim == 4:
        lab = lab[0]
    x = _np(image)
    if x.shape != lab.shape:
        raise ValueError(f"image {x.shape} and labels {lab.shape} must share one grid")
    o = {**_DEFAULTS, **opts}
    if regions is None:
        regions = structure_regions(lab, spacing, structures, o["ventricle_margin_mm"], o["mtl_margin_mm"])
    if levels is None:
        levels = intensity_levels(x, lab, spacing, structures)
    return x, lab, regions, levels, o


def structure_volumes(image: Any, labels: Any, spacing: float | Sequence[float],
                      structures: Mapping[str, Sequence[int]] = STRUCTURES, **options: float) -> dict[str, float]:
    """Image-based volumes (ml) of ``structures`` in ``image`` ``(1, *spatial)`` or ``spatial``, regions from ``labels``
    (``spatial`` integer map on the same grid), ``spacing`` in mm (scalar or per axis).

    Ventricles: CSF partial-volume content of their region; other structures: tissue partial-volume content under
    their membership weights; fractions clipped to [0, 1]. ``options``: ``ventricle_margin_mm``, ``mtl_margin_mm``,
    ``sigma_vox``, ``gain`` (see the module docstring).
    """
    x, lab, regions, levels, o = _prepare(image, labels, spacing, structures, None, None, options)
    ml = float(np.prod(_spacing(spacing))) / 1000.0
    fr = _fractions(x, lab, regions, levels, structures, o["sigma_vox"], o["gain"])
    return {n: float((w * np.clip(f, 0.0, 1.0)).sum() * ml) for n, (w, f) in fr.items()}


def match_intensity(input: np.ndarray, other: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """``other`` mapped onto ``input``'s intensity scale by one gain, ``median(input) / median(other)`` over ``mask``
    (tissue the edit leaves alone, e.g. white matter away from the structures). Percentile normalisation scales each
    image on its own (a gain: the skull-stripped background is 0), and one percent of gain over a region of a thousand
    voxels would otherwise read as a volume change. Returns ``(matched, gain)``."""
    if mask.sum() < 10:
        return other, 1.0
    a, b = float(np.median(input[mask])), float(np.median(other[mask]))
    g = a / b if a > 0 and b > 0 else 1.0
    return other * g, g


def volume_change(input: Any, counterfactual: Any, labels: Any, spacing: float | Sequence[float],
                  structures: Mapping[str, Sequence[int]] = STRUCTURES, match: bool = True,
                  **options: float) -> dict[str, float]:
    """Volume change from ``input`` to ``counterfactual`` (both ``(1, *spatial)`` or ``spatial`` on one grid), measured
    in the regions of the INPUT's ``labels`` with the input's intensity levels.

    Returns ``{"<structure>_ml": change in ml, "<structure>_pct": 100 * change / the input's label-map volume}`` (as
    boundary-shift studies report percent of the baseline segmentation) per structure present in ``labels`` (e.g.
    ``ventricles_ml`` > 0 for enlargement, ``hippocampus_ml`` < 0 for atrophy).
    The sum is linear (unclipped), so both images must share an intensity scale: ``match`` first maps the
    counterfactual onto the input's scale (:func:`match_intensity` on the white matter outside every region).
    """
    x, lab, regions, levels, o = _prepare(input, labels, spacing, structures, None, None, options)
    y = _np(counterfactual)
    if y.shape != x.shape:
        raise ValueError(f"input {x.shape} and counterfactual {y.shape} must share one grid")
    if match:
        outside = ~np.any(list(regions.values()), axis=0) if regions else np.ones(x.shape, bool)
        wm = outside & (lab == TISSUE_LABELS["wm"])
        ref = wm if wm.sum() >= 100 else outside & (x > np.percentile(x[_brain(lab, structures, x)], 75))
        y = match_intensity(x, y, ref)[0]
    ml = float(np.prod(_spacing(spacing))) / 1000.0
    f0 = _fractions(x, lab, regions, levels, structures, o["sigma_vox"], o["gain"])
    f1 = _fractions(y, lab, regions, levels, structures, o["sigma_vox"], o["gain"])
    out = {}
    for n, (w, a) in f0.items():
        d = float((w * (f1[n][1] - a)).sum() * ml)
        base = float(np.isin(lab, structures[n]).sum() * ml)
        out[f"{n}_ml"] = d
        out[f"{n}_pct"] = 100.0 * d / base if base > 0 else float("nan")
    return out


def label_volume_change(labels_input: Any, labels_counterfactual: Any, spacing: float | Sequence[float],
                        structures: Mapping[str, Sequence[int]] = STRUCTURES) -> dict[str, float]:
    """Label-map volume change (ml and %) per structure: voxel counts of the two maps (the reference)."""
    ml = float(np.prod(_spacing(spacing))) / 1000.0
    a, b = np.asarray(labels_input), np.asarray(labels_counterfactual)
    out = {}
    for n, ids in structures.items():
        v0, v1 = np.isin(a, ids).sum() * ml, np.isin(b, ids).sum() * ml
        out[f"{n}_ml"] = float(v1 - v0)
        out[f"{n}_pct"] = 100.0 * float(v1 - v0) / v0 if v0 > 0 else float("nan")
    return out


def volume_agreement(predicted: Sequence[float], true: Sequence[float], min_abs: float = 0.0) -> dict[str, Any]:
    """How a set of predicted changes matches the true ones (pairs with ``|true| <= min_abs`` are left out).

    Returns ``{"n", "sign_agreement": share with the true sign, "median_magnitude_ratio": median |pred| / |true|,
    "median_relative_error": median |pred - true| / |true|, "slope": least-squares slope of pred on true through 0,
    "pearson"}`` (``None`` where undefined).
    """
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    keep = np.isfinite(p) & np.isfinite(t) & (np.abs(t) > min_abs)
    p, t = p[keep], t[keep]
    if not len(t):
        return {"n": 0, "sign_agreement": None, "median_magnitude_ratio": None, "median_relative_error": None,
                "slope": None, "pearson": None}
    r = float(np.corrcoef(p, t)[0, 1]) if len(t) > 2 and p.std() > 0 and t.std() > 0 else None
    return {"n": int(len(t)), "sign_agreement": float(np.mean(np.sign(p) == np.sign(t))),
            "median_magnitude_ratio": float(np.median(np.abs(p) / np.abs(t))),
            "median_relative_error": float(np.median(np.abs(p - t) / np.abs(t))),
            "slope": float(p @ t / (t @ t)), "pearson": r}


def pair_volume_changes(input: Any, counterfactual: Any, ground_truth: Any | None, labels: Any,
                        spacing: float | Sequence[float], true_ml: Mapping[str, float] | None = None,
                        structures: Mapping[str, Sequence[int]] = STRUCTURES) -> dict[str, dict[str, float]]:
    """Per structure ``{"predicted", "ground_truth_image", "label_map"}`` volume changes (ml) of one pair: the
    counterfactual's and the exact ground truth's image-based change, and the label-map change ``true_ml`` (e.g.
    from the manifest's volume columns); missing parts are NaN."""
    pred = volume_change(input, counterfactual, labels, spacing, structures)
    gt = volume_change(input, ground_truth, labels, spacing, structures) if ground_truth is not None else {}
    nan = float("nan")
    return {n: {"predicted": pred.get(f"{n}_ml", nan), "ground_truth_image": gt.get(f"{n}_ml", nan),
                "label_map": float((true_ml or {}).get(n, nan))} for n in structures}


def summarize_volume_changes(per_pair: Sequence[Mapping[str, Mapping[str, float]]], groups: Sequence[str],
                             min_abs_ml: float = 0.05) -> dict[str, Any]:
    """Group per-pair changes (:func:`pair_volume_changes`) by ``groups`` (e.g. the intervened attribute) and score
    the prediction against the ground-truth image and the label map, and the ground-truth image against the label
    map (the measure's own error). Bars (issue 13): sign right in >= 80 % of pairs, median magnitude ratio in
    [0.5, 1.5]; ``meets_bar`` is judged against the label map."""
    out: dict[str, Any] = {}
    for g in sorted(set(groups)):
        idx = [i for i, k in enumerate(groups) if k == g]
        per_s = {}
        for n in per_pair[idx[0]]:
            col = {k: [per_pair[i][n][k] for i in idx] for k in ("predicted", "ground_truth_image", "label_map")}
            vs_label = volume_agreement(col["predicted"], col["label_map"], min_abs_ml)
            per_s[n] = {
                "vs_label_map": vs_label,
                "vs_ground_truth_image": volume_agreement(col["predicted"], col["ground_truth_image"], min_abs_ml),
                "measure_error": volume_agreement(col["ground_truth_image"], col["label_map"], min_abs_ml),
                "mean_ml": {k: float(np.nanmean(v)) if np.isfinite(v).any() else None for k, v in col.items()},
                "meets_bar": None if vs_label["n"] == 0 else bool(
                    vs_label["sign_agreement"] >= 0.8 and 0.5 <= vs_label["median_magnitude_ratio"] <= 1.5),
            }
        out[g] = {"n_pairs": len(idx), "structures": per_s}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the evaluator's hook (monai_ld.jobs.run_evaluation)
# ---------------------------------------------------------------------------------------------------------------
def load_pair_labels(manifest: str, pairs: Sequence[Mapping], notes: dict | None = None) -> list[dict] | None:
    """The input's label map of each evaluation pair on the pair's preprocessed grid, and the label-map truth.

    ``pairs``: from :func:`~.pairs.load_counterfactual_pairs` (``image`` a MetaTensor that keeps its affine).
    Label maps (manifest column ``label_path``) are resampled nearest-neighbour onto that grid; the true change comes
    from the manifest's native-resolution volume columns (``ventricle_ml``, ...) when present, else from the two
    resampled label maps. Returns ``[{"labels": (spatial) int array, "spacing": (3,), "true_ml": {structure: ml}}]``
    or ``None`` (with a note) when the manifest has no label maps.
    """
    from monai.data import MetaTensor
    from monai.transforms import LoadImage, ResampleToMatch

    if pairs and getattr(pairs[0]["image"], "ndim", 4) != 4:  # (1, *spatial): the structures are 3D brain ones
        if notes is not None:
            notes["volumes"] = "regional volumes are measured on 3D brain label maps only: not measured for 2D images"
        return None
    rows = {r["image_id"]: r for r in read_manifest(manifest, _NoAttributes(), required=("image_id", "path"))}
    if not all((rows.get(p["image_id"], {}).get("label_path") or "").strip() for p in pairs):
        if notes is not None:
            notes["volumes"] = "the manifest has no label_path for the evaluated images: volumes are not measured"
        return None
    load, resample = LoadImage(image_only=True, ensure_channel_first=True), ResampleToMatch(mode="nearest")
    out = []
    for p in pairs:
        img = p["image"]
        if not isinstance(img, MetaTensor):
            raise ValueError("volumes need the preprocessed image's affine (a MetaTensor from the preprocessing chain)")

        def on_grid(row):
            lab = load(manifest_path({**row, "path": row["label_path"]}))
            return np.rint(resample(lab.float(), img_dst=img)[0].numpy()).astype(np.int64)

        f, g = rows[p["image_id"]], rows[p["gt_id"]]
        labels = on_grid(f)
        spacing = np.sqrt((np.asarray(img.affine, dtype=np.float64)[:3, :3] ** 2).sum(0))
        if all(MANIFEST_COLUMNS[n] in f and MANIFEST_COLUMNS[n] in g for n in STRUCTURES):
            true = {n: float(g[c]) - float(f[c]) for n, c in MANIFEST_COLUMNS.items()}
        else:
            true = {k[:-3]: v for k, v in label_volume_change(labels, on_grid(g), spacing).items() if k.endswith("_ml")}
        out.append({"labels": labels, "spacing": spacing, "true_ml": true})
    return out


class _NoAttributes:
    names: tuple = ()


def evaluation_volumes(collected: Mapping[str, Any], label_info: Sequence[Mapping]) -> dict[str, Any]:
    """Volume report of one δ: ``collected`` (``input`` / ``counterfactual`` / ``ground_truth`` ``(N, 1, *spatial)``,
    ``intervened`` lists, in pair order) and :func:`load_pair_labels`. Returns ``{"per_attribute":
    summarize_volume_changes(...), "per_pair": [...]}``, grouped by the (first) intervened attribute."""
    per_pair, groups, rows = [], [], []
    for i, info in enumerate(label_info):
        ch = pair_volume_changes(collected["input"][i], collected["counterfactual"][i], collected["ground_truth"][i],
                                 info["labels"], info["spacing"], info["true_ml"])
        names = list(collected["intervened"][i])
        per_pair.append(ch)
        groups.append(names[0] if names else "none")
        rows.append({"image_id": (collected.get("image_id") or [""] * len(label_info))[i], "intervened": names,
                     **{n: v for n, v in ch.items()}})
    return {"per_attribute": summarize_volume_changes(per_pair, groups), "per_pair": rows,
            "definitions": "image-based change (boundary-shift style partial-volume fractions in the input's "
                           "regions; monai_ld.evaluation.volumes) of the counterfactual vs of the exact ground-truth "
                           "image and vs the label-map change; bar: sign right >= 80 %, median |pred|/|true| in [0.5, 1.5]"}


def volumes_markdown(volumes: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines of :func:`evaluation_volumes` (empty when there is none)."""
    if not volumes:
        return []

    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    lines = ["", "Regional volume change (ml; predicted vs label-map truth; sign = share of pairs with the true sign, "
             "ratio = median |pred|/|true|; GT-image = the measure on the exact ground truth):", "",
             "| attribute | structure | n | pred mean | GT-image mean | label mean | sign | ratio | GT-image rel. err | bar |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g, d in volumes["per_attribute"].items():
        for n, s in d["structures"].items():
            a, m, e = s["vs_label_map"], s["mean_ml"], s["measure_error"]
            bar = "n/a" if s["meets_bar"] is None else ("yes" if s["meets_bar"] else "no")
            lines.append(f"| {g} | {n} | {a['n']} | {f(m['predicted'])} | {f(m['ground_truth_image'])} | "
                         f"{f(m['label_map'])} | {f(a['sign_agreement'])} | {f(a['median_magnitude_ratio'])} | "
                         f"{f(e['median_relative_error'])} | {bar} |")
    return lines
