"""How well can ANY oracle tell the brain phantom's diagnosis from one image? A ceiling for issue 13's oracle bar.

    python benchmarks/dx_separability.py bundles/brain_mri_counterfactual --split val

The diagnosis moves only the ventricles (+1.5 mm x severity) and the medial temporal lobe (-1.5 mm x severity), by
less than the spread of those structures across subjects and ages (age alone moves the ventricles up to 3.6 mm).
This fits the volumetric oracle (``monai_ld.evaluation.volume_oracle.VolumeOracle``: a multinomial logistic
regression with balanced class weights) on the EXACT label-map volumes of every structure (log ml: ventricles,
hippocampi, amygdalae, grey and white matter, CSF, brain; read from the manifests, no image model involved) of the
training subjects (the bundle's ``train`` split plus the campaign's extra training subjects when rendered), and
scores it where the oracle bar is scored: the diagnosis ground-truth pairs of ``--split`` (accuracy on the intended
target class, as ``brain_report.py`` scores the CNN oracle), next to its accuracy on the split's subjects. Exact
volumes are what an image oracle can at best measure of this effect, so its target accuracy on the exact ground
truth is an estimate of how far any oracle's can go. Prints a table and writes JSON with ``--out``.
"""

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

import torch

from monai_ld.evaluation.volume_oracle import VolumeOracle

FEATURES = ("ventricle_ml", "hippocampus_ml", "amygdala_ml", "gm_ml", "wm_ml", "csf_ml", "brain_ml")
CLASSES = ("CN", "MCI", "AD")


def rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("bundle")
p.add_argument("--split", default="val", choices=("val", "test"))
p.add_argument("--features", nargs="+", default=list(FEATURES), choices=FEATURES, help="volume columns (default: all)")
p.add_argument("--l2", type=float, default=1e-3)
p.add_argument("--out", default=None, help="write the numbers as JSON here")
a = p.parse_args()
b = Path(a.bundle)
main = rows(b / "data" / "manifest.csv")
extra_manifest = b / "data_train_extra" / "manifest.csv"
train = [r for r in main if r["split"] == "train" and not r["counterfactual_of"]]
if extra_manifest.exists():
    train += [r for r in rows(extra_manifest) if not r["counterfactual_of"]]  # other identities: all training data
subjects = [r for r in main if r["split"] == a.split and not r["counterfactual_of"]]
by_id = {r["image_id"]: r for r in main}
gts = [r for r in main if r["split"] == a.split and r["counterfactual_of"]
       and by_id[r["counterfactual_of"]]["diagnosis"] != r["diagnosis"]]
if not gts:
    raise SystemExit(f"{b / 'data' / 'manifest.csv'} has no diagnosis ground-truth pairs in split {a.split!r}")
oracle = VolumeOracle("diagnosis", CLASSES, a.features).fit(train, l2=a.l2)  # balanced class weights


def vols(rs: list[dict]) -> list[list[float]]:
    return [[float(r[f]) for f in a.features] for r in rs]


want = torch.tensor([CLASSES.index(r["diagnosis"]) for r in gts])
src, gt = oracle.predict_proba(vols([by_id[r["counterfactual_of"]] for r in gts])), oracle.predict_proba(vols(gts))
per, hit = Counter(), Counter()
for r, g in zip(gts, (gt.argmax(1) == want).tolist()):
    k = f"{by_id[r['counterfactual_of']]['diagnosis']}->{r['diagnosis']}"
    per[k] += 1
    hit[k] += g
report = {"split": a.split, "n_train": len(train), "train_classes": dict(Counter(r["diagnosis"] for r in train)),
          "n_subjects": len(subjects), "n_pairs": len(gts), "features": a.features, "l2": a.l2,
          "train_accuracy": oracle.train_accuracy,
          "subject_accuracy": float(sum(p == r["diagnosis"] for p, r in zip(oracle.predict(vols(subjects)), subjects))
                                    / len(subjects)),
          "gt_target_accuracy": float((gt.argmax(1) == want).double().mean()),
          "input_target_accuracy": float((src.argmax(1) == want).double().mean()),
          "gt_target_probability_rises": float((gt.gather(1, want[:, None]) > src.gather(1, want[:, None])).double().mean()),
          "per_transition": {k: f"{hit[k]}/{per[k]}" for k in sorted(per)}}
print(f"diagnosis from exact label-map volumes ({', '.join(a.features)}): {report['n_train']} training subjects {report['train_classes']}, "
      f"split {a.split}: {report['n_subjects']} subjects, {report['n_pairs']} diagnosis ground-truth pairs")
print("| subject accuracy | target accuracy: exact GT / input | P(target) rises input -> GT | per transition (GT) |")
print("|---|---|---|---|")
print(f"| {report['subject_accuracy']:.3f} | {report['gt_target_accuracy']:.3f} / {report['input_target_accuracy']:.3f} | "
      f"{report['gt_target_probability_rises']:.3f} | {', '.join(f'{t} {v}' for t, v in report['per_transition'].items())} |")
if a.out:
    Path(a.out).write_text(json.dumps(report, indent=2))
