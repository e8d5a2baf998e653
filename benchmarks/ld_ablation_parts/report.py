"""Statistics over seeds, the Markdown report and the plot of ``benchmarks/ld_ablation.py``."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

METRICS = ("fid", "kid", "auc", "effectiveness", "gt_l1")
LOWER_IS_BETTER = {"fid": True, "kid": True, "auc": False, "effectiveness": False, "gt_l1": True}
SCHEMES = ("full", "embedding", "lora")
LD_ARMS = ("off", "train", "train+sample")
BASE_ARMS = ("off", "sample")
LABEL = {"off": "LD off (δ=0)", "train": "LD in fine-tuning", "train+sample": "LD fine-tuning + sampling",
         "sample": "sampling-only δ"}


def mean_std(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def paired(ld, off) -> dict:
    """LD − no LD per seed, mean and the 95 % t-interval over seeds (n − 1 degrees of freedom)."""
    d = np.asarray(ld, dtype=float) - np.asarray(off, dtype=float)
    m = float(d.mean())
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"per_seed": d.tolist(), "mean": m, "ci95": [m - half, m + half]}


def summarise(cells: dict) -> dict:
    """``cells[name][seed] -> metrics`` -> mean ± std per cell and the paired LD − off differences per scheme."""
    summary = {name: {k: mean_std([cells[name][s][k] for s in sorted(cells[name])]) for k in METRICS} for name in cells}
    diffs = {}
    for scheme in ("base",) + SCHEMES:
        off = cells.get(f"{scheme}/off", {})
        for arm in (BASE_ARMS[1:] if scheme == "base" else LD_ARMS[1:]):
            on = cells.get(f"{scheme}/{arm}", {})
            seeds = sorted(set(off) & set(on))
            if not seeds:  # a run stopped early: report what finished
                continue
            diffs[f"{scheme}/{arm}"] = {k: paired([on[s][k] for s in seeds], [off[s][k] for s in seeds]) for k in METRICS}
    return {"cells": summary, "paired_differences": diffs}


def verdict(diff: dict, metric: str) -> str:
    lo, hi = diff["ci95"]
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return "no significant change"
    better = (hi < 0) == LOWER_IS_BETTER[metric]
    return "better" if better else "worse"


def _fmt(x: float, metric: str) -> str:
    # oracle features are small numbers: FID/KID need significant digits, not fixed decimals
    return f"{x:.3g}" if metric in ("fid", "kid", "gt_l1") else f"{x:.3f}"


def headline_table(result: dict) -> str:
    cells = result["summary"]["cells"]
    head = "| scheme | LD | " + " | ".join(m.upper() if m != "gt_l1" else "GT L1" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for scheme in ("base",) + SCHEMES:
        for arm in (BASE_ARMS if scheme == "base" else LD_ARMS):
            if f"{scheme}/{arm}" not in cells:
                continue
            c = cells[f"{scheme}/{arm}"]
            vals = " | ".join(f"{_fmt(c[m]['mean'], m)} ± {_fmt(c[m]['std'], m)}" for m in METRICS)
            lines.append(f"| {scheme} | {LABEL[arm]} | {vals} |")
    return "\n".join(lines)


def diff_table(result: dict) -> str:
    lines = ["| scheme | LD − off | " + " | ".join(m.upper() if m != "gt_l1" else "GT L1" for m in METRICS) + " |",
             "|" + "---|" * (len(METRICS) + 2)]
    for key, d in result["summary"]["paired_differences"].items():
        scheme, arm = key.split("/")
        vals = " | ".join(f"{_fmt(d[m]['mean'], m)} [{_fmt(d[m]['ci95'][0], m)}, {_fmt(d[m]['ci95'][1], m)}] "
                          f"({verdict(d[m], m)})" for m in METRICS)
        lines.append(f"| {scheme} | {LABEL[arm]} | {vals} |")
    return "\n".join(lines)


def findings(result: dict) -> list[str]:
    """Sentences derived from the numbers (which arm changed which metric significantly), no prose written in advance."""
    out = []
    for key, d in result["summary"]["paired_differences"].items():
        better = [m for m in METRICS if verdict(d[m], m) == "better"]
        worse = [m for m in METRICS if verdict(d[m], m) == "worse"]
        scheme, arm = key.split("/")
        out.append(f"- **{scheme}, {LABEL[arm]}**: significantly better on {', '.join(better) or 'nothing'}; "
                   f"significantly worse on {', '.join(worse) or 'nothing'} (95 % t-interval over "
                   f"{len(d['fid']['per_seed'])} seeds).")
    return out


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["summary"]["cells"]
    colors = {"off": "#888888", "sample": "#e0a030", "train": "#4a90d9", "train+sample": "#c0392b"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = axes.ravel()
    groups = ("base",) + SCHEMES
    handles = {}
    for ax, m in zip(axes, METRICS):
        for gi, scheme in enumerate(groups):
            arms = BASE_ARMS if scheme == "base" else LD_ARMS
            for ai, arm in enumerate(arms):
                if f"{scheme}/{arm}" not in cells:
                    continue
                c = cells[f"{scheme}/{arm}"][m]
                x = gi + (ai - (len(arms) - 1) / 2) * 0.26
                handles[arm] = ax.bar(x, c["mean"], 0.24, yerr=c["std"], color=colors[arm], capsize=3)
        ax.set_xticks(range(len(groups)), groups)
        arrow = "↓" if LOWER_IS_BETTER[m] else "↑"
        ax.set_title(f"{m.upper() if m != 'gt_l1' else 'GT L1'} ({arrow} better)")
        lo = min(cells[k][m]["mean"] - cells[k][m]["std"] for k in cells)
        hi = max(cells[k][m]["mean"] + cells[k][m]["std"] for k in cells)
        if m == "gt_l1":  # the do-nothing baseline: the unedited input's distance to the ground truth
            ref = float(np.mean([v["gt_l1_input"] for v in result["cells"]["base/off"].values()]))
            handles["input"] = ax.axhline(ref, color="k", ls="--", lw=1)
            lo, hi = min(lo, ref), max(hi, ref)
        if m in ("auc", "effectiveness", "gt_l1") and hi > lo:
            ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo)), hi + 0.15 * (hi - lo))
    axes[-1].axis("off")
    names = {**LABEL, "input": "unedited input (GT L1)"}
    axes[-1].legend(list(handles.values()), [names[k] for k in handles], loc="center", frameon=False, fontsize=11)
    fig.suptitle(f"Latent Drifting ablation, CXR target domain (test split; mean ± std over {result['config']['n_seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve_table(curves: dict) -> str:
    drifts = [p["drift"] for p in next(iter(curves.values()))["curve"]]
    lines = ["| model | " + " | ".join(f"{d:+.2f}" for d in drifts) + " | chosen |", "|" + "---|" * (len(drifts) + 2)]
    for name, c in curves.items():
        by = {p["drift"]: p for p in c["curve"]}
        vals = " | ".join(f"{by[d]['objective']:.4f} / {by[d].get('kid', float('nan')):.3f}" if d in by else "–" for d in drifts)
        lines.append(f"| {name} | {vals} | {c['best_drift']:+.2f} |")
    return "\n".join(lines)


def sign_notes(result: dict) -> list[str]:
    """Per search: the best val objective at δ < 0, δ = 0 and δ > 0 (does the sign matter?)."""
    out = []
    for kind, curves in result["searches"].items():
        for name, c in curves.items():
            best = {}
            for p in c["curve"]:
                side = "δ<0" if p["drift"] < 0 else ("δ>0" if p["drift"] > 0 else "δ=0")
                best[side] = min(best.get(side, float("inf")), p["objective"])
            out.append(f"- {kind} δ, {name}: best val L1 " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(best.items())))
    return out


def markdown(result: dict) -> str:
    cfg, shift, o = result["config"], result["domain_shift"], result["oracle"]
    sv, tv = shift["source_vs_target"], shift["target_vs_target"]
    s, t = shift["source_settings"], shift["target_settings"]
    quick = " (**--quick toy run: numbers meaningless**)" if result["quick"] else ""
    return "\n".join([
        f"# Latent Drifting ablation: CXR phantoms, domain shift, {cfg['n_seeds']} seeds{quick}",
        "",
        "Generated by `OMP_NUM_THREADS=1 python benchmarks/ld_ablation.py` (issue #14; `--quick` = toy sizes, used by",
        f"`tests/test_ld_ablation.py`). Wall time of this run: **{result['wall_time_s'] / 60:.1f} min** on "
        f"{cfg['threads']} CPU thread(s) (phases, s: {result['timings_s']}). The 3D brain rows are not here: they wait "
        "for the brain campaign's model.",
        "",
        "## Protocol",
        f"- **Base (source domain)**: `{cfg['base']}`, the shipped ConditionalLDM (128², trained on standard phantoms).",
        f"- **Target domain** (another site; `benchmarks/ld_ablation_parts/domain.py`, renderer unchanged, disease effect "
        f"sizes untouched): characteristic-curve slope γ {t['gamma']} (source {s['gamma']}), offset {t['exposure']} "
        f"(source {s['exposure']}), detector noise {t['noise']} (source {s['noise']}), field of view {t['fov_mm']} mm "
        f"(source {s['fov_mm']} mm), age {t['age']} (source {s['age']}), cardiomegaly in 50 % (source ≈ 12–37 %, rising with age).",
        f"- **Target splits** (disjoint subjects): fine-tune {cfg['n_finetune']} images (the only images any model trains on), "
        f"val {cfg['n_val']} (δ search, {cfg['n_val_gen']} generated per δ), test {cfg['n_test']} real + {cfg['n_gen']} "
        f"generated per cell (conditioned on the test subjects' attributes), {cfg['n_pairs']} ground-truth pairs "
        f"(cardiomegaly switched on/off, exact counterfactual of the same identity), oracle split {cfg['n_oracle']}.",
        f"- **Fine-tuning**: {cfg['ft_iters']} iterations, batch {cfg['ft_batch']}, lr {cfg['lr']}; LD forward drift with the "
        f"`shifted` target (ε' = ε + δ). Sampling: DDIM {cfg['steps']} steps, no guidance; sampling drift = +δ after every "
        f"step, z_T ~ N(0, I). Counterfactuals: the bundle's default edit (inversion, strength 0.5, paired composition, "
        f"DiffEdit mask 0.4), {cfg['cf_steps']} steps, δ while generating.",
        f"- **δ search** (paper grid {cfg['drifts'][0]}…{cfg['drifts'][-1]}, objective = the paper's Monte-Carlo L1 between "
        "mean generated and mean real val image; KID recorded): the training δ once, with seed-0 "
        f"`{cfg['train_search_scheme']}` fine-tunes over the grid, each sampled at its own δ (the paper's LD), and used "
        "for every scheme; the sampling δ per scheme on its seed-0 model fine-tuned with that training δ, and on the base. "
        "Chosen on seed 0 and reused for all seeds, to stay affordable.",
        f"- **Metrics on the test split**: FID and KID on the penultimate features of an oracle ResNet trained on "
        f"{cfg['n_oracle']} real target images (never on generated ones; its {FINDING_NAME} accuracy on real test images: "
        f"{o['test_accuracy_cardiomegaly']:.3f}); downstream AUC = a small ResNet classifier (on 2× average-pooled 64² images, {cfg['clf_epochs']} epochs) trained on the {cfg['n_gen']} generated "
        f"images ({FINDING_NAME} label = its condition), tested on the real test images (the same classifier trained on "
        f"the real fine-tune set: {o['real_finetune_set_auc']:.3f}); effectiveness = oracle accuracy for the intended "
        "cardiomegaly on the counterfactuals; GT L1 = mean |counterfactual − exact counterfactual|.",
        f"- **Small samples**: FID from {cfg['n_gen']} vs {cfg['n_test']} samples is biased upwards and only comparable "
        "within this table; KID is unbiased. Std = over seeds; intervals = t-interval of the per-seed paired difference.",
        "",
        "## The shift is real",
        f"| sets ({shift['n_per_set']} images each) | FID | KID |", "|---|---|---|",
        f"| source vs target test half A | {sv['fid']:.3g} | {sv['kid']:.3g} |",
        f"| target test half B vs half A | {tv['fid']:.3g} | {tv['kid']:.3g} |",
        "", f"FID ratio source/target = {sv['fid'] / max(tv['fid'], 1e-12):.1f}×.",
        "",
        "## Chosen δ",
        "| model | training δ | sampling δ |", "|---|---|---|",
        *[f"| {k} | {v.get('training', '–')} | {v.get('sampling', '–')} |" for k, v in result["chosen_drift"].items()],
        "",
        "Val curves (L1 objective / KID) — training δ (each model sampled at its own δ):", "",
        _curve_table(result["searches"]["training"]), "",
        "Sampling δ:", "", _curve_table(result["searches"]["sampling"]), "",
        "Does the sign matter (val)?", *sign_notes(result), "",
        "## Results (test split, mean ± std over seeds)",
        headline_table(result), "",
        "![LD ablation](images/ld_ablation.png)", "",
        "## Paired difference LD − LD off (mean [95 % CI] over seeds)",
        "Lower is better for FID, KID, GT L1; higher for AUC and effectiveness.", "",
        diff_table(result), "",
        "## Findings (derived from the intervals above)",
        *findings(result), *caveats(result), "",
    ])


FINDING_NAME = "cardiomegaly"


def caveats(result: dict) -> list[str]:
    """What limits the counterfactual metrics, from the numbers."""
    cells = result["summary"]["cells"]
    eff = [c["effectiveness"]["mean"] for c in cells.values()]
    gt = [c["gt_l1"]["mean"] for c in cells.values()]
    inp = float(np.mean([v["gt_l1_input"] for v in result["cells"]["base/off"].values()]))
    return [f"- Effectiveness ranges {min(eff):.3f}–{max(eff):.3f} over the cells (the oracle's own accuracy on real "
            f"test images: {result['oracle']['test_accuracy_cardiomegaly']:.3f}): "
            + ("most edits do not flip the oracle's cardiomegaly call, with or without LD." if max(eff) < 0.5 else
               "the oracle sees the intended cardiomegaly in most edits."),
            f"- GT L1 ranges {min(gt):.3g}–{max(gt):.3g}, the unedited input's is {inp:.3g}: every cell's "
            f"counterfactuals are {'closer to' if max(gt) < inp else 'not all closer to'} the exact ground truth than the input."]
