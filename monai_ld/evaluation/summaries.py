"""Markdown summaries of the two report kinds: the counterfactual evaluation and the δ sweep (``report.md``).

They read the ``report.json`` dicts (after a JSON round trip) that :mod:`monai_ld.jobs` writes, so they need nothing
but the report itself; :data:`METRIC_DESCRIPTIONS` is also stored in every evaluation report under ``definitions``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .volumes import volumes_markdown

__all__ = ["METRIC_DESCRIPTIONS", "format_value", "evaluation_markdown", "sweep_markdown"]


def format_value(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


METRIC_DESCRIPTIONS = {
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


def evaluation_markdown(report: Mapping) -> str:
    """``report.md`` of a counterfactual evaluation: one column per δ, the main one marked, then notes."""
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
        vals = [format_value(report["by_drift"][d]["metrics"].get(k)) for d in drifts]
        desc = METRIC_DESCRIPTIONS.get(k, f"null intervention ×{k[len('composition_k'):]}, L1 to original ↓" if k.startswith("composition_k") else "")
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


def sweep_markdown(report: Mapping) -> str:
    """``report.md`` of a δ sweep: the best δ and the curve."""
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
