"""Held-out phantom pairs: is the counterfactual closer to the exact ground-truth counterfactual than the input is?

    python benchmarks/gt_check.py bundles/brain_mri_counterfactual --n 10 --steps 25 --drifts 0 0.05 \
        --strengths 0.3 0.6 --guidances 1 3 --composition paired

Prints one JSON line per (guidance, strength, drift, mask threshold): mean L1 and SSIM of counterfactual vs GT and of
input vs GT, the mean per-pair gain over the input with its standard error (``l1_gain``, ``ssim_gain``; > 0 = closer),
the autoencoder reconstruction's, and the same split by intervened attribute (``by_attribute``), since findings
whose placement is the subject's own (unobservable) draw cannot be predicted from the image. Choose settings on pairs
disjoint from the reported ones (``--skip``).

``latent_oracle_l1`` is the ceiling the autoencoder allows: ``x + D(E(gt)) - D(E(x))`` (posterior means), the paired
composition of a perfect diffusion model that lands exactly on the ground truth's latent. When it is not below ``input_l1``, no
diffusion training can make the counterfactual closer to the ground truth than the input: improve the autoencoder.
``--ceilings`` prints only the limits (no edits): the true change blurred by a Gaussian of 0.5-2 voxels (a
perfectly placed but soft change; L1 punishes blur of a sharp boundary shift), and the latent oracle kept inside the
true change's support. The bundle's phantoms are generated first when absent (``configs/common.json``'s ``phantoms``).
"""

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

import torch

from monai_ld import bundle_support
from monai_ld.evaluation import PipelineEditor, ground_truth_error, load_counterfactual_pairs
from monai_ld.evaluation.pairs import add_latent_oracle
from monai_ld.pipeline import CounterfactualPipeline

p = argparse.ArgumentParser()
p.add_argument("bundle")
p.add_argument("--n", type=int, default=10)
p.add_argument("--steps", type=int, default=25)
p.add_argument("--drifts", type=float, nargs="+", default=[0.0])
p.add_argument("--strengths", type=float, nargs="+", default=[None])
p.add_argument("--guidances", type=float, nargs="+", default=[None])
p.add_argument("--composition", default=None)
p.add_argument("--mask-thresholds", type=float, nargs="+", default=[None],
               help="DiffEdit mask thresholds to compare (default: the model's setting)")
p.add_argument("--split", default="test", help="manifest split of the pairs")
p.add_argument("--skip", type=int, default=0,
               help="leave out the split's first SKIP pairs: choose settings on pairs (e.g. --skip 60) disjoint from "
                    "those reported (the default, the first N)")
p.add_argument("--ceilings", action="store_true",
               help="print only the ceilings (no edits): the true change blurred by a Gaussian of sigma voxels (how "
                    "sharp a perfectly placed change must be to beat the input) and the latent oracle kept inside the "
                    "true change's support (the autoencoder's limit under a perfect mask)")
p.add_argument("--autoencoder", default=None,
               help="with --ceilings: an autoencoder file (train_autoencoder.json's output) to measure instead of the "
                    "model's own, e.g. a candidate before training a diffusion model on it")
p.add_argument("--checkpoint", default=None)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
if a.autoencoder and not a.ceilings:
    p.error("--autoencoder only applies with --ceilings (edits need the diffusion model's own autoencoder)")
torch.set_num_threads(a.threads)
b = Path(a.bundle)
ph = json.loads((b / "configs" / "common.json").read_text())["phantoms"]  # shared by the train/evaluate configs
manifest = bundle_support.ensure_phantoms(str(b / "data"), ph["kind"], ph["n"], ph["size"], ph["seed"],
                                          ph.get("counterfactual_splits", ["test"]))
pipe = CounterfactualPipeline.from_checkpoint(a.checkpoint or b / "models" / "model.pt")
if a.autoencoder:
    from monai_ld.engines.training import load_autoencoder

    pipe.model.autoencoder = load_autoencoder(a.autoencoder)[0].eval()
pairs = load_counterfactual_pairs(manifest, pipe.model.meta["preprocessing"], pipe.encoder, a.split, a.skip + a.n)[a.skip:]
x = torch.stack([q["image"] for q in pairs]).float()
gt = torch.stack([q["ground_truth"] for q in pairs]).float()
bound = add_latent_oracle([{"image": x, "ground_truth": gt}], PipelineEditor(pipe).autoencode)[0]["latent_oracle"]
oracle_l1 = round(ground_truth_error(bound, gt, x)["counterfactual"]["l1"], 4)
groups = defaultdict(list)
for i, q in enumerate(pairs):
    groups["+".join(q["intervened"])].append(i)


def _r(r, which, metric):
    return round(r[which][metric], 4)


def _paired(r, metric):
    """Mean per-pair gain over the unchanged input (L1: input - cf, SSIM: cf - input) and its standard error."""
    ps = r["per_sample"]
    d = torch.tensor(ps[f"input_{metric}"], dtype=torch.float64) - torch.tensor(ps[f"counterfactual_{metric}"], dtype=torch.float64)
    d = d if metric == "l1" else -d
    se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")
    return {"mean": round(float(d.mean()), 5), "se": round(se, 5)}


def _both(r):
    return {"l1": round(r["counterfactual"]["l1"], 5), "ssim": round(r["counterfactual"]["ssim"], 5)}


if a.ceilings:
    from monai.transforms import GaussianSmooth

    change = gt - x
    # where the true change is, grown by 2 voxels: a perfect mask with the same slack as the inferer's region
    grow = torch.nn.functional.max_pool3d if change.ndim == 5 else torch.nn.functional.max_pool2d
    region = grow((change.abs() > 0.01).float(), kernel_size=5, stride=1, padding=2)
    blurred = {str(s): _both(ground_truth_error(x + torch.stack([GaussianSmooth(s)(c) for c in change]), gt, x))
               for s in (0.5, 1.0, 1.5, 2.0)}
    print(json.dumps({"split": a.split, "pairs": [a.skip, a.skip + len(pairs)], "n": len(pairs),
                      "input": _both(ground_truth_error(x, gt, x)),
                      "true_change_blurred_sigma_voxels": blurred,
                      "latent_oracle": _both(ground_truth_error(bound, gt, x)),
                      "latent_oracle_true_region": _both(ground_truth_error(x + region * (bound - x), gt, x))}))
    raise SystemExit(0)

for guidance, strength, d, mt in itertools.product(a.guidances, a.strengths, a.drifts, a.mask_thresholds):
    cfs, recs = [], []
    for q in pairs:
        plan = pipe.resolve({k: q["target"][k] for k in q["intervened"]}, q["source"], drift=d, strength=strength,
                            num_inference_steps=a.steps, guidance_scale=guidance, composition=a.composition, mask_threshold=mt)
        out = pipe.edit(q["image"][None].float(), plan)
        cfs.append(out.image[0]), recs.append(out.reconstruction[0])
    cf, rec = torch.stack(cfs), torch.stack(recs)
    res = ground_truth_error(cf, gt, x)
    by = {}
    for name, idx in sorted(groups.items()):
        r = ground_truth_error(cf[idx], gt[idx], x[idx])
        by[name] = {"n": len(idx), "cf_l1": _r(r, "counterfactual", "l1"), "input_l1": _r(r, "input", "l1"),
                    "cf_ssim": _r(r, "counterfactual", "ssim"), "input_ssim": _r(r, "input", "ssim")}
    rr = ground_truth_error(rec, gt, x)
    print(json.dumps({"split": a.split, "pairs": [a.skip, a.skip + len(pairs)], "guidance_scale": guidance if guidance is not None else pipe.defaults["guidance_scale"],
                      "strength": strength if strength is not None else pipe.defaults["strength"],
                      "drift": d, "composition": a.composition or pipe.defaults["composition"],
                      "mask_threshold": mt if mt is not None else pipe.defaults.get("mask_threshold"), "n": len(pairs),
                      "steps": a.steps,
                      "cf_l1": _r(res, "counterfactual", "l1"), "cf_ssim": _r(res, "counterfactual", "ssim"),
                      "input_l1": _r(res, "input", "l1"), "input_ssim": _r(res, "input", "ssim"),
                      "recon_l1": _r(rr, "counterfactual", "l1"), "recon_ssim": _r(rr, "counterfactual", "ssim"),
                      "latent_oracle_l1": oracle_l1,
                      "l1_gain": _paired(res, "l1"), "ssim_gain": _paired(res, "ssim"),
                      "fraction_closer_than_input": res["fraction_closer_than_input"], "by_attribute": by}),
          flush=True)
