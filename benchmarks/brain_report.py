"""Does the brain model move the anatomy? The measures of issue 13 on held-out ground-truth pairs, in one command.

    python benchmarks/brain_report.py bundles/brain_mri_counterfactual --split val --n 24 --out /tmp/brain_val
    python benchmarks/brain_report.py bundles/brain_mri_counterfactual --split test --n 24 \
        --out bundles/brain_mri_counterfactual/docs/ground_truth      # the final report only: test is touched once

Per intervened attribute (diagnosis, age): the Pearson correlation between the predicted change (cf − input) and the
true change (gt − input) inside the brain (the input's label map > 0, grown by one voxel); the image-based regional
volume changes (ventricles, hippocampus, amygdala; ``monai_ld.evaluation.volumes``) against the label-map truth;
the oracle's effectiveness on the counterfactual next to the same oracle on the exact ground truth (ceiling) and on
the untouched input (floor) — diagnosis: accuracy on the target class; age: the share of pairs whose predicted age
moves in the intended direction (and the MAE to the target); for the diagnosis also the volumetric oracle
(``monai_ld.evaluation.volume_oracle``, fitted on the train split's label-map volumes) on the counterfactual, on the
autoencoder's latent oracle, on the ground truth and on the input, and the latent oracle's own volume changes (how
much of each change the autoencoder can carry); and L1 / SSIM to the ground truth, in the brain and
everywhere, next to the input's. Writes ``report.json``, ``report.md`` and ``figure.png`` (input | counterfactual |
ground truth | predicted Δ | true Δ, planes through the ventricles and hippocampi of one pair per attribute).
Choose settings and checkpoints on ``val``; report on ``test``.
"""

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from monai_ld import bundle_support
from monai_ld.evaluation import AttributeOracle, PipelineEditor, ground_truth_error, load_counterfactual_pairs
from monai_ld.evaluation.pairs import add_latent_oracle
from monai_ld.evaluation.volume_oracle import VOLUME_FEATURES, VolumeOracle, edited_volumes
from monai_ld.evaluation.volumes import STRUCTURES, evaluation_volumes, load_pair_labels
from monai_ld.pipeline import CounterfactualPipeline

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("bundle")
p.add_argument("--checkpoint", default=None, help="model (default: <bundle>/models/model.pt)")
p.add_argument("--oracle", default=None, help="attribute oracle (default: <bundle>/models/oracle.pt)")
p.add_argument("--split", default="val", choices=("val", "test"))
p.add_argument("--n", type=int, default=24)
p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's, as the bundle runs)")
p.add_argument("--guidance", type=float, default=None)
p.add_argument("--strength", type=float, default=None)
p.add_argument("--drift", type=float, default=None, help="LD δ (default: the model's)")
p.add_argument("--mask-threshold", type=float, default=None, dest="mask_threshold")
p.add_argument("--composition", default=None)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--out", required=True, help="output folder (report.json, report.md, figure.png)")
a = p.parse_args()
torch.set_num_threads(a.threads)
b, out = Path(a.bundle), Path(a.out)
t0 = time.perf_counter()
ph = json.loads((b / "configs" / "common.json").read_text())["phantoms"]  # shared by the train/evaluate configs
manifest = bundle_support.ensure_phantoms(str(b / "data"), ph["kind"], ph["n"], ph["size"], ph["seed"],
                                          ph.get("counterfactual_splits", ["test"]))
pipe = CounterfactualPipeline.from_checkpoint(a.checkpoint or b / "models" / "model.pt")
pairs = load_counterfactual_pairs(manifest, pipe.model.meta["preprocessing"], pipe.encoder, a.split, a.n)[: a.n]
labels = load_pair_labels(manifest, pairs)
if labels is None:
    raise SystemExit(f"{manifest} has no label maps (label_path): the brain mask and volumes need them")
cfs = []
for q in pairs:
    plan = pipe.resolve({k: q["target"][k] for k in q["intervened"]}, q["source"], drift=a.drift, strength=a.strength,
                        num_inference_steps=a.steps, guidance_scale=a.guidance, composition=a.composition,
                        mask_threshold=a.mask_threshold)
    cfs.append(pipe.edit(q["image"][None].float(), plan).image[0].cpu())
x = torch.stack([q["image"].as_tensor() if hasattr(q["image"], "as_tensor") else q["image"] for q in pairs]).float()
gt = torch.stack([q["ground_truth"].as_tensor() if hasattr(q["ground_truth"], "as_tensor") else q["ground_truth"]
                  for q in pairs]).float()
cf = torch.stack(cfs).float()
brain = torch.stack([torch.from_numpy(ndi.binary_dilation(info["labels"] > 0))[None] for info in labels])
attr = [q["intervened"][0] for q in pairs]
groups = defaultdict(list)
for i, k in enumerate(attr):
    groups[k].append(i)


# the correlation's ceilings: the autoencoder's latent oracle x + D(E(gt)) - D(E(x)) (what a perfect latent edit gives)
# and the true change blurred by a Gaussian of one voxel
bound = add_latent_oracle([{"image": x, "ground_truth": gt}], PipelineEditor(pipe).autoencode)[0]["latent_oracle"]
blur1 = x + torch.stack([torch.from_numpy(ndi.gaussian_filter((g - v)[0].numpy(), 1.0))[None] for g, v in zip(gt, x)])


def corr(i: int, edit: torch.Tensor | None = None) -> float:
    m, e = brain[i, 0], (cf if edit is None else edit)
    pc, tc = (e[i, 0] - x[i, 0])[m].double(), (gt[i, 0] - x[i, 0])[m].double()
    if pc.std() == 0 or tc.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([pc, tc]))[0, 1])


oracle = AttributeOracle.load(a.oracle or b / "models" / "oracle.pt")
pred = {k: oracle.predict(v) for k, v in (("counterfactual", cf), ("ground_truth", gt), ("input", x))}
dx_classes = list(pipe.encoder["diagnosis"].classes)


def effect(name: str, idx: list[int]) -> dict:
    """Diagnosis: oracle accuracy on the target class; age: share moving the intended way, and MAE to the target."""
    res = {}
    for which, pr in pred.items():
        if name == "diagnosis":
            got = pr["diagnosis"][idx].argmax(1) if pr["diagnosis"].ndim == 2 else pr["diagnosis"][idx].long()
            want = torch.tensor([dx_classes.index(pairs[i]["target"]["diagnosis"]) for i in idx])
            res[which] = {"effectiveness": float((got == want).double().mean())}
        else:
            age = pr["age"].reshape(-1).double()
            base = pred["input"]["age"].reshape(-1).double()
            want = torch.tensor([float(pairs[i]["target"]["age"]) - float(pairs[i]["source"]["age"]) for i in idx])
            moved = age[idx] - base[idx]
            tgt = torch.tensor([float(pairs[i]["target"]["age"]) for i in idx])
            # the untouched input does not move, so its direction score would be 0 by construction: its floor is the MAE
            eff = None if which == "input" else float((torch.sign(moved) == torch.sign(want)).double().mean())
            res[which] = {"effectiveness": eff,
                          "mae_to_target": float((age[idx] - tgt).abs().mean())}
    return res


def gt_err(idx: list[int]) -> dict:
    whole = ground_truth_error(cf[idx], gt[idx], x[idx])
    inside = ground_truth_error(cf[idx], gt[idx], x[idx], mask=brain[idx].float())
    return {"cf_l1": whole["counterfactual"]["l1"], "input_l1": whole["input"]["l1"],
            "cf_ssim": whole["counterfactual"]["ssim"], "input_ssim": whole["input"]["ssim"],
            "brain_cf_l1": inside["counterfactual"]["l1"], "brain_input_l1": inside["input"]["l1"],
            "brain_cf_ssim": inside["counterfactual"]["ssim"], "brain_input_ssim": inside["input"]["ssim"],
            "fraction_closer_than_input": whole["fraction_closer_than_input"]}


volume_report = evaluation_volumes({"input": x, "counterfactual": cf, "ground_truth": gt,
                                    "intervened": [q["intervened"] for q in pairs]}, labels)
vols = volume_report["per_attribute"]
# the same for the autoencoder's latent oracle (a perfect latent edit): how much of each volume change the autoencoder
# can carry at all
bound_report = evaluation_volumes({"input": x, "counterfactual": bound, "ground_truth": gt,
                                   "intervened": [q["intervened"] for q in pairs]}, labels)
# the volumetric oracle (diagnosis from regional volumes, fitted on the train split's label-map volumes): the input's
# label-map volumes plus the change measured from each image; on the exact ground truth's label map as well
with open(manifest, newline="") as fh:
    mrows = {r["image_id"]: r for r in csv.DictReader(fh)}
vol_oracle = VolumeOracle("diagnosis", dx_classes).fit(
    [r for r in mrows.values() if r["split"] == "train" and not r["counterfactual_of"]])


def volume_effect(idx: list[int]) -> dict:
    want = [pairs[i]["target"]["diagnosis"] for i in idx]
    src = [mrows[pairs[i]["image_id"]] for i in idx]
    changes = [volume_report["per_pair"][i] for i in idx]
    feats = {"counterfactual": [edited_volumes(r, {s: c[s]["predicted"] for s in STRUCTURES}) for r, c in zip(src, changes)],
             "latent_oracle": [edited_volumes(r, {s: bound_report["per_pair"][i][s]["predicted"] for s in STRUCTURES})
                               for r, i in zip(src, idx)],
             "ground_truth": [edited_volumes(r, {s: c[s]["ground_truth_image"] for s in STRUCTURES})
                              for r, c in zip(src, changes)],
             "ground_truth_label_map": [[float(mrows[pairs[i]["gt_id"]][f]) for f in VOLUME_FEATURES] for i in idx],
             "input": [[float(r[f]) for f in VOLUME_FEATURES] for r in src]}
    return {"train_accuracy": vol_oracle.train_accuracy, **{
        k: {"effectiveness": float(np.mean([p == w for p, w in zip(vol_oracle.predict(v), want)]))} for k, v in feats.items()}}


report = {"bundle": b.name, "checkpoint": str(a.checkpoint or "models/model.pt"), "oracle": str(a.oracle or "models/oracle.pt"),
          "split": a.split, "n": len(pairs),
          "settings": {"num_inference_steps": a.steps, "guidance_scale": a.guidance, "strength": a.strength, "drift": a.drift,
                       "mask_threshold": a.mask_threshold, "composition": a.composition, "defaults": pipe.defaults},
          "per_attribute": {}}
for name, idx in sorted(groups.items()):
    c = [corr(i) for i in idx]
    report["per_attribute"][name] = {
        "n": len(idx), "change_correlation_in_brain": {"mean": float(np.nanmean(c)), "median": float(np.nanmedian(c)),
                                                         "per_pair": c,
                                                         "latent_oracle": float(np.nanmean([corr(i, bound) for i in idx])),
                                                         "true_change_blurred_1_voxel": float(np.nanmean([corr(i, blur1) for i in idx]))},
        "oracle": effect(name, idx), "ground_truth_error": gt_err(idx), "volumes": vols.get(name),
        "latent_oracle_volumes": bound_report["per_attribute"].get(name),
        **({"volume_oracle": volume_effect(idx)} if name == "diagnosis" else {})}
report["seconds"] = round(time.perf_counter() - t0, 1)
out.mkdir(parents=True, exist_ok=True)
(out / "report.json").write_text(json.dumps(report, indent=2, default=float))


def _f(v, d=3):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{d}f}"


lines = [f"# {b.name}: does the model move the anatomy? ({a.split}, {len(pairs)} pairs)", "",
         f"settings: {json.dumps(report['settings'])}; {report['seconds']} s", "",
         "Oracle effectiveness: diagnosis = accuracy on the target class; age = share of pairs whose predicted age moves "
         "the intended way (the input, which does not move, has none: its age floor is the MAE to the target in "
         "report.json).", "",
         "corr ceilings: the same correlation for the autoencoder's latent oracle x + D(E(gt)) − D(E(x)) and for the true "
         "change blurred by a Gaussian of one voxel.", "",
         "| attribute | n | corr(pred Δ, true Δ) in brain | corr ceilings: latent oracle / blur 1 voxel | oracle cf / GT (ceiling) / input (floor) | L1 cf / input (brain) | SSIM cf / input (brain) |",
         "|---|---|---|---|---|---|---|"]
for name, r in report["per_attribute"].items():
    o, e = r["oracle"], r["ground_truth_error"]
    cc = r["change_correlation_in_brain"]
    lines.append(f"| {name} | {r['n']} | {_f(cc['mean'])} | {_f(cc['latent_oracle'])} / {_f(cc['true_change_blurred_1_voxel'])} | "
                 f"{_f(o['counterfactual']['effectiveness'], 2)} / {_f(o['ground_truth']['effectiveness'], 2)} / "
                 f"{_f(o['input']['effectiveness'], 2)} | {_f(e['brain_cf_l1'], 5)} / {_f(e['brain_input_l1'], 5)} | "
                 f"{_f(e['brain_cf_ssim'], 4)} / {_f(e['brain_input_ssim'], 4)} |")
vo = report["per_attribute"].get("diagnosis", {}).get("volume_oracle")
if vo:
    lines += ["", "Volumetric oracle (diagnosis from log volumes of ventricles, hippocampi, amygdalae and brain; logistic "
              f"regression on the train split's label maps, train accuracy {_f(vo['train_accuracy'], 2)}; an image's "
              "volumes = the input's label-map volumes + the change measured from the image): accuracy on the target "
              f"class, cf {_f(vo['counterfactual']['effectiveness'], 2)} / the autoencoder's latent oracle "
              f"{_f(vo['latent_oracle']['effectiveness'], 2)} / GT image (ceiling) "
              f"{_f(vo['ground_truth']['effectiveness'], 2)} / GT label map {_f(vo['ground_truth_label_map']['effectiveness'], 2)}"
              f" / input (floor) {_f(vo['input']['effectiveness'], 2)}."]
lines += ["", "Volume change (image-based; sign agreement with the label-map truth, median |pred| / |true|):", "",
          "| attribute | structure | sign right | magnitude ratio | latent oracle's sign / ratio | GT image's own sign / ratio |",
          "|---|---|---|---|---|---|"]
for name, r in report["per_attribute"].items():
    for s, v in ((r["volumes"] or {}).get("structures") or {}).items():
        lab, me = v["vs_label_map"], v["measure_error"]
        lo = r["latent_oracle_volumes"]["structures"][s]["vs_label_map"]
        lines.append(f"| {name} | {s} | {_f(lab.get('sign_agreement'), 2)} | {_f(lab.get('median_magnitude_ratio'), 2)} | "
                     f"{_f(lo.get('sign_agreement'), 2)} / {_f(lo.get('median_magnitude_ratio'), 2)} | "
                     f"{_f(me.get('sign_agreement'), 2)} / {_f(me.get('median_magnitude_ratio'), 2)} |")
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

# the figure: one pair per attribute, planes through the ventricles (axial) and the hippocampi (coronal, sagittal)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = []
for name, idx in sorted(groups.items()):
    i = idx[0]
    lab = labels[i]["labels"]
    cv = [int(round(v)) for v in ndi.center_of_mass(np.isin(lab, STRUCTURES["ventricles"]))]
    ch = [int(round(v)) for v in ndi.center_of_mass(np.isin(lab, STRUCTURES["hippocampus"][:1]))]
    planes = {"axial (ventricles)": lambda v: v[:, :, cv[2]], "coronal (hippocampi)": lambda v: v[:, ch[1], :],
              "sagittal (left hippocampus)": lambda v: v[ch[0], :, :]}
    for pname, cut in planes.items():
        rows.append((f"{name} {pairs[i]['source'][name]}→{pairs[i]['target'][name]}\n{pname}",
                     [np.rot90(cut(v[i, 0].numpy())) for v in (x, cf, gt, cf - x, gt - x)]))
fig, axes = plt.subplots(len(rows), 5, figsize=(13, 2.7 * len(rows)), squeeze=False, layout="constrained")
for r, (title, panels) in enumerate(rows):
    m = max(float(np.abs(panels[3]).max()), float(np.abs(panels[4]).max())) or 1.0
    for c, img in enumerate(panels):
        kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if c < 3 else {"cmap": "RdBu_r", "vmin": -m, "vmax": m}
        axes[r, c].imshow(img, **kw)
        axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
    axes[r, 0].set_ylabel(title, fontsize=8)
for c, t in enumerate(["input", "counterfactual", "exact ground truth", "predicted Δ (cf − input)", "true Δ (gt − input)"]):
    axes[0, c].set_title(t, fontsize=9)
fig.suptitle(f"{b.name} ({a.split} pairs; Δ panels share one symmetric colour range per row)", fontsize=10)
fig.savefig(out / "figure.png", dpi=80)
print(f"wrote {out}/report.json, report.md, figure.png")
