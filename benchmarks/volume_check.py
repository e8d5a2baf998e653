"""Does the image-based volume change recover the label-map change on exact ground-truth pairs?

Renders held-out brain-phantom pairs (an input and its exact counterfactual: the same identity with CN -> AD, or
age + 20 y) on the bundle's grid (``--size 64``, fov 184 mm -> 2.875 mm), measures the change of ventricles,
hippocampi and amygdalae from the images (:func:`monai_ld.evaluation.volumes.volume_change`, regions and levels from
the input alone) and compares it with the label-map change of the same renders. ``--reference-size 128`` also renders
the label maps at twice the resolution: the 64³ label map is itself a quantised reference (its own error is printed).

    OMP_NUM_THREADS=1 python benchmarks/volume_check.py --pairs 24            # ~30 s
    OMP_NUM_THREADS=1 python benchmarks/volume_check.py --pairs 24 --reference-size 128 --json out.json
    OMP_NUM_THREADS=1 python benchmarks/volume_check.py --manifest data/manifest.csv   # the evaluator's own path

``--manifest`` measures what ``monai-ld evaluate`` reports as the measure's own error: the manifest's ground-truth
pairs through the bundle's preprocessing (each image its own percentile scaling), label maps resampled onto that
grid, the image-based change of the exact ground truth vs the manifest's label-map volumes.

Aggregates per structure (and per attribute): median relative error |img - label| / |label|, least-squares slope of
img on label through 0, Pearson r. The defaults of the measure were set on seeds 1000-1031; this script uses
``--seed0 5000`` (held out).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from monai_ld.data.phantoms.brain import BrainPhantom
from monai_ld.evaluation.volumes import STRUCTURES, label_volume_change, volume_agreement, volume_change

KEYS = {"ventricles": "ventricle_ml", "hippocampus": "hippocampus_ml", "amygdala": "amygdala_ml"}


def render_pairs(n: int, size: int = 64, seed0: int = 5000, reference_size: int | None = None):
    """``n`` pairs, alternating CN -> AD and age + 20 y; yields dicts with images, labels and label-map changes."""
    ph = BrainPhantom()
    rng = np.random.default_rng(seed0)
    for i in range(n):
        ident = ph.sample_identity(seed0 + i)
        kind = "diagnosis" if i % 2 == 0 else "age"
        age = float(np.round(rng.uniform(45, 90 if kind == "diagnosis" else 75), 1))
        a = {"age": age, "sex": "F" if rng.uniform() < 0.5 else "M", "diagnosis": "CN"}
        b = {**a, "diagnosis": "AD"} if kind == "diagnosis" else {**a, "age": age + 20.0}
        r0, r1 = ph.render(ident, a, size), ph.render(ident, b, size)
        sp = ph.fov_mm / size
        out = {"kind": kind, "input": r0.image, "gt": r1.image, "labels": r0.labels, "spacing": sp,
               "label_ml": {k[:-3]: v for k, v in label_volume_change(r0.labels, r1.labels, sp).items() if k.endswith("_ml")}}
        if reference_size:
            h0, h1 = ph.render(ident, a, reference_size), ph.render(ident, b, reference_size)
            out["label_ref_ml"] = {n: h1.measurements[c] - h0.measurements[c] for n, c in KEYS.items()}
        yield out


BUNDLE_PREPROCESSING = {"chain": "brain_mri", "spatial_size": [64, 64, 64], "pixdim": [2.875] * 3, "axcodes": "RAS"}


def check_manifest(manifest: str, split: str | None = "test") -> dict:
    """The evaluator's path (:func:`~monai_ld.evaluation.volumes.evaluation_volumes` with the ground truth as the
    prediction): per attribute and structure, the GT image's change vs the manifest's label-map change."""
    import torch

    from monai_ld.data.phantoms import brain_attribute_encoder
    from monai_ld.evaluation import load_counterfactual_pairs
    from monai_ld.evaluation.volumes import evaluation_volumes, load_pair_labels

    pairs = load_counterfactual_pairs(manifest, BUNDLE_PREPROCESSING, brain_attribute_encoder(), split)
    info = load_pair_labels(manifest, pairs)
    col = {"input": torch.stack([p["image"] for p in pairs]), "ground_truth": torch.stack([p["ground_truth"] for p in pairs]),
           "intervened": [p["intervened"] for p in pairs], "image_id": [p["image_id"] for p in pairs]}
    col["counterfactual"] = col["ground_truth"]
    vol = evaluation_volumes(col, info)
    print(f"{len(pairs)} ground-truth pairs of split {split!r} in {manifest} (bundle preprocessing 64^3, 2.875 mm)\n")
    print("| attribute | structure | n | sign | median rel. err | slope | mean label ml | mean GT-image ml |")
    print("|---|---|---|---|---|---|---|---|")
    for g, d in vol["per_attribute"].items():
        for n, s in d["structures"].items():
            e, m = s["measure_error"], s["mean_ml"]
            print(f"| {g} | {n} | {e['n']} | {e['sign_agreement']:.2f} | {e['median_relative_error']:.1%} | "
                  f"{e['slope']:.3f} | {m['label_map']:+.3f} | {m['ground_truth_image']:+.3f} |")
    return vol


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed0", type=int, default=5000)
    ap.add_argument("--reference-size", type=int, default=None, help="also render label maps at this size (e.g. 128)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--manifest", default=None, help="check a phantom manifest's ground-truth pairs instead (evaluator path)")
    ap.add_argument("--split", default="test")
    args = ap.parse_args(argv)
    if args.manifest:
        return check_manifest(args.manifest, args.split)
    t0 = time.perf_counter()
    rows = []
    for p in render_pairs(args.pairs, args.size, args.seed0, args.reference_size):
        img = volume_change(p["input"], p["gt"], p["labels"], p["spacing"])
        rows.append({"kind": p["kind"], "image_ml": {n: img[f"{n}_ml"] for n in STRUCTURES}, "label_ml": p["label_ml"],
                     **({"label_ref_ml": p["label_ref_ml"]} if "label_ref_ml" in p else {})})
    print(f"{len(rows)} pairs at {args.size}^3 ({184.0 / args.size:.3f} mm), seeds {args.seed0}..{args.seed0 + args.pairs - 1}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| pair | change | structure | label-map ml | image ml | rel. err |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        for n in STRUCTURES:
            t, e = r["label_ml"][n], r["image_ml"][n]
            print(f"| {i} | {r['kind']} | {n} | {t:+.3f} | {e:+.3f} | {abs(e - t) / abs(t) if t else float('nan'):.1%} |")
    refs = [("label_ml", f"label map {args.size}^3")] + ([("label_ref_ml", f"label map {args.reference_size}^3")]
                                                        if args.reference_size else [])
    summary: dict = {}
    print("\n| reference | change | structure | n | median rel. err | slope | pearson | mean label ml | mean image ml |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, name in refs:
        for kind in ("diagnosis", "age", "all"):
            sel = [r for r in rows if kind == "all" or r["kind"] == kind]
            for n in STRUCTURES:
                t, e = [r[key][n] for r in sel], [r["image_ml"][n] for r in sel]
                a = volume_agreement(e, t)
                summary.setdefault(key, {}).setdefault(kind, {})[n] = {**a, "mean_label_ml": float(np.mean(t)),
                                                                       "mean_image_ml": float(np.mean(e))}
                print(f"| {name} | {kind} | {n} | {a['n']} | {a['median_relative_error']:.1%} | {a['slope']:.3f} | "
                      f"{a['pearson']:.3f} | {np.mean(t):+.3f} | {np.mean(e):+.3f} |")
    if args.reference_size:  # how far the coarse label map itself is from the finer one
        print(f"\n| label map {args.size}^3 vs {args.reference_size}^3 | change | structure | median rel. err | slope |")
        print("|---|---|---|---|---|")
        for kind in ("diagnosis", "age", "all"):
            sel = [r for r in rows if kind == "all" or r["kind"] == kind]
            for n in STRUCTURES:
                a = volume_agreement([r["label_ml"][n] for r in sel], [r["label_ref_ml"][n] for r in sel])
                summary.setdefault("label_vs_reference", {}).setdefault(kind, {})[n] = a
                print(f"| | {kind} | {n} | {a['median_relative_error']:.1%} | {a['slope']:.3f} |")
    out = {"pairs": args.pairs, "size": args.size, "seed0": args.seed0, "reference_size": args.reference_size,
           "summary": summary, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
