"""Does Latent Drifting help here? The paper's Table 1 protocol on CXR phantoms, with seeds (issue #14).

    OMP_NUM_THREADS=1 python benchmarks/ld_ablation.py            # full 2D run -> docs/ld_ablation.{md,json}, plot
    python benchmarks/ld_ablation.py --quick --out-dir /tmp/ldq   # the whole grid at toy size (~1 min; the test)

Source domain = the shipped bundle's training phantoms; its model (``bundles/chest_xray_counterfactual``) is the
pre-trained base. Target domain = another acquisition and population (``ld_ablation_parts/domain.py``). Splits of
the target: fine-tune (the only images any model trains on), val (δ searches), test (every reported number),
ground-truth pairs (counterfactuals) and an oracle split (the oracle / feature network, real images only).

Grid: base model {δ=0, sampling-only δ} + scheme ∈ {full, embedding, lora} × {LD off, forward drift in fine-tuning,
forward drift + sampling drift} × seeds. δ (paper grid −0.2…0.2 step 0.05, ``drift_grid()``), all on val:
the training δ per scheme with seed-0 fine-tunes (each sampled at its own δ, the paper's LD); the sampling δ per
scheme on the seed-0 model fine-tuned with the chosen training δ, and on the base model. Seed-0 cells reuse the
search's fine-tunes (same length, same seed); the other seeds fine-tune afresh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ld_ablation_parts import report  # noqa: E402
from ld_ablation_parts.domain import TARGET, Domains  # noqa: E402
from ld_ablation_parts.measure import (FINDING, Judge, counterfactuals, generate, run_finetune,  # noqa: E402
                                       search_sampling_drift)

from monai_ld.evaluation import downstream_auc, drift_grid, train_oracle  # noqa: E402
from monai_ld.evaluation.drift_search import mean_image_l1, search_drift  # noqa: E402
from monai_ld.networks.model import ConditionalLDM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "bundles/chest_xray_counterfactual/models/model.pt"


@dataclasses.dataclass
class Config:
    n_finetune: int = 64
    n_val: int = 32
    n_val_gen: int = 16
    n_test: int = 96
    n_gen: int = 48
    n_pairs: int = 16
    n_oracle: int = 192
    n_source: int = 96
    steps: int = 10
    cf_steps: int = 10
    ft_iters: int = 50
    ft_batch: int = 8
    lr: dict = dataclasses.field(default_factory=lambda: {"full": 3e-4, "embedding": 3e-3, "lora": 2e-3})
    clf_epochs: int = 8
    oracle_epochs: int = 15
    seeds: tuple = (0, 1, 2)
    train_search_scheme: str = "full"
    drifts: tuple = tuple(drift_grid(-0.2, 0.2, 0.05))


QUICK = dict(n_finetune=8, n_val=6, n_val_gen=4, n_test=8, n_gen=8, n_pairs=4, n_oracle=16, n_source=8, steps=2,
             cf_steps=2, ft_iters=2, ft_batch=4, clf_epochs=1, oracle_epochs=1, drifts=(-0.2, 0.0, 0.2))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def domain_shift(dom, judge, cfg) -> dict:
    """FID/KID(source, target test half A) vs (target test half B, half A): equal set sizes, same features."""
    h = cfg.n_test // 2
    src, _ = dom.split("source", min(cfg.n_source, h))
    a, b = judge.test_images[:h], judge.test_images[h : 2 * h]
    fa = judge.oracle.features(a)
    return {"source_vs_target": judge.realism(src, fa), "target_vs_target": judge.realism(b, fa), "n_per_set": h,
            "target_settings": TARGET, "source_settings": {"fov_mm": 360.0, "gamma": [0.85, 1.2], "exposure": [0.92, 1.08],
                                                           "noise": [0.008, 0.025], "age": [20.0, 90.0]}}


def write_outputs(result: dict, out: Path, json_too: bool = True) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    if json_too:
        (out / "ld_ablation.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    report.plot(result, out / "images/ld_ablation.png")
    (out / "ld_ablation.md").write_text(report.markdown(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes: the whole grid in about a minute")
    ap.add_argument("--out-dir", default=str(ROOT / "docs"), help="writes ld_ablation.{json,md} and images/ld_ablation.png")
    ap.add_argument("--work-dir", default="/tmp/ld_ablation_work", help="fine-tuned checkpoints (deleted cell by cell)")
    ap.add_argument("--base", default=str(BASE), help="the source-domain pre-trained ConditionalLDM")
    ap.add_argument("--resume", action="store_true", help="keep the cells, δ searches and fine-tunes of an interrupted "
                    "run with the same config in --work-dir (checkpoints there are reused by name)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the .md and the plot from the existing .json")
    args = ap.parse_args()
    out = Path(args.out_dir)
    if args.report_only:
        write_outputs(json.loads((out / "ld_ablation.json").read_text()), out, json_too=False)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = Config(**QUICK) if args.quick else Config()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start, timings = time.perf_counter(), {}

    def lap(name, t0):
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    base = ConditionalLDM.load(args.base)
    dom = Domains(int(base.meta.get("preprocessing", {}).get("size", 128)))
    ft_images, ft_rows = dom.split("finetune", cfg.n_finetune)
    val_images, val_rows = dom.split("val", cfg.n_val)
    test_images, test_rows = dom.split("test", cfg.n_test)
    oracle_images, oracle_rows = dom.split("oracle", cfg.n_oracle)
    pairs = dom.pairs(cfg.n_pairs)
    samples = [{"image": x, "condition": base.encoder.encode(r).reshape(1, -1)} for x, r in zip(ft_images, ft_rows)]
    lap("render", t0)
    log(f"rendered target splits (finetune {cfg.n_finetune}, val {cfg.n_val}, test {cfg.n_test}, pairs {cfg.n_pairs}, oracle {cfg.n_oracle})")

    t0 = time.perf_counter()
    oracle = train_oracle(oracle_images, oracle_rows, dom.encoder, epochs=cfg.oracle_epochs, seed=0)
    judge = Judge(oracle, test_images, test_rows, pairs, dom.encoder, cfg)
    pred = oracle.predict(test_images)[FINDING]
    oracle_acc = float((pred == judge.test_labels).float().mean())
    pool = torch.nn.functional.avg_pool2d  # the same classifier as the cells', on the real fine-tune set
    real_auc = downstream_auc(pool(ft_images, 2), [int(r[FINDING]) for r in ft_rows], pool(test_images, 2),
                              judge.test_labels, epochs=cfg.clf_epochs, seed=0)["auc_synthetic"]
    shift = domain_shift(dom, judge, cfg)
    lap("oracle+shift", t0)
    log(f"oracle test accuracy ({FINDING}) {oracle_acc:.3f}; real-data AUC {real_auc:.3f}; shift {json.dumps(shift['source_vs_target'])} vs {json.dumps(shift['target_vs_target'])}")

    gen_rows = test_rows[: cfg.n_gen]
    val_gen_rows = val_rows[: cfg.n_val_gen]
    drifts = list(cfg.drifts)
    cells: dict = {}
    searches: dict = {"training": {}, "sampling": {}}
    chosen: dict = {}
    if args.resume and (work / "partial.json").is_file():  # cells, searches and δ of an interrupted run
        old = json.loads((work / "partial.json").read_text())
        cells = {k: {int(s): v for s, v in c.items()} for k, c in old["cells"].items()}
        searches, chosen, timings = old["searches"], old["chosen"], old.get("timings_s", {})
        t_start -= old.get("elapsed_s", 0.0)  # the wall time counts the interrupted run too
        log(f"resumed {sum(len(c) for c in cells.values())} cells from {work / 'partial.json'}")

    def score(name, model, drift, seed):
        if seed in cells.get(name, {}):
            return  # resumed
        t = time.perf_counter()
        imgs = generate(model, gen_rows, drift, 1000 + seed, cfg.steps)
        cf = counterfactuals(model, pairs, drift, seed, cfg)
        m = judge.cell(imgs, gen_rows, cf, seed)
        cells.setdefault(name, {})[seed] = {**m, "drift_sampling": drift}
        lap("score", t)
        # progress on disk: a run stopped early still leaves every finished cell
        (work / "partial.json").write_text(json.dumps({"cells": cells, "searches": searches, "chosen": chosen,
                                                       "timings_s": timings, "elapsed_s": time.perf_counter() - t_start},
                                                      default=float))
        log(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))

    # base model: δ = 0 and sampling-only δ
    t0 = time.perf_counter()
    if "base" not in chosen:
        searches["sampling"]["base"] = search_sampling_drift(base, val_gen_rows, val_images, judge, drifts, 7, cfg.steps)
        chosen["base"] = {"sampling": searches["sampling"]["base"]["best_drift"]}
    lap("delta_search", t0)
    for seed in cfg.seeds:
        if seed not in cells.get("base/sample", {}):
            score("base/off", base, 0.0, seed)
            score("base/sample", base, chosen["base"]["sampling"], seed)

    # training δ: searched once, with seed-0 fine-tunes of one scheme over the grid, each sampled at its own δ (the
    # paper's LD) on val; a search per scheme would triple the most expensive part of the run
    t0 = time.perf_counter()
    tune = lambda scheme, d, seed: run_finetune(samples, Path(args.base), work / f"{scheme}_seed{seed}_d{d:+.2f}.pt",  # noqa: E731
                                                scheme, d, seed, cfg)
    if cfg.train_search_scheme not in searches["training"]:
        vf = judge.oracle.features(val_images)
        searches["training"][cfg.train_search_scheme] = search_drift(
            lambda d: generate(tune(cfg.train_search_scheme, d, 0), val_gen_rows, d, 7, cfg.steps),
            lambda g: {"objective": mean_image_l1(g, val_images), **judge.realism(g, vf)}, drifts)
    d_train = searches["training"][cfg.train_search_scheme]["best_drift"]
    lap("delta_search", t0)
    log(f"chosen training δ {d_train} ({cfg.train_search_scheme}, seed 0)")
    for scheme in report.SCHEMES:
        for seed in cfg.seeds:
            if all(seed in cells.get(f"{scheme}/{a}", {}) for a in report.LD_ARMS):
                continue  # resumed
            t = time.perf_counter()
            off, on = tune(scheme, 0.0, seed), tune(scheme, d_train, seed)
            lap("finetune", t)
            if scheme not in chosen:  # sampling δ: per scheme, on its seed-0 model fine-tuned with the training δ
                t = time.perf_counter()
                searches["sampling"][scheme] = search_sampling_drift(on, val_gen_rows, val_images, judge, drifts, 7, cfg.steps)
                chosen[scheme] = {"training": d_train, "sampling": searches["sampling"][scheme]["best_drift"]}
                lap("delta_search", t)
                log(f"{scheme}: sampling δ {chosen[scheme]['sampling']}")
            score(f"{scheme}/off", off, 0.0, seed)
            score(f"{scheme}/train", on, 0.0, seed)
            score(f"{scheme}/train+sample", on, chosen[scheme]["sampling"], seed)
        for p in work.glob(f"{scheme}_*.pt"):
            p.unlink()

    wall = time.perf_counter() - t_start
    result = {
        "issue": 14, "quick": bool(args.quick), "config": {**dataclasses.asdict(cfg), "n_seeds": len(cfg.seeds),
                                                           "threads": torch.get_num_threads(), "base": str(Path(args.base).relative_to(ROOT)) if Path(args.base).is_relative_to(ROOT) else args.base},
        "domain_shift": shift, "oracle": {"feature_network": "oracle-penultimate (trained on real target images only)",
                                          "test_accuracy_" + FINDING: oracle_acc, "real_finetune_set_auc": real_auc},
        "chosen_drift": chosen, "searches": searches,
        "cells": {k: {str(s): v for s, v in sorted(c.items())} for k, c in cells.items()},
        "summary": report.summarise(cells), "timings_s": timings, "wall_time_s": round(wall, 1),
    }
    write_outputs(result, out)
    log(f"done in {wall:.0f} s -> {out}/ld_ablation.{{json,md}}, {out}/images/ld_ablation.png")


if __name__ == "__main__":
    main()
