"""Held-out phantom pairs: is the counterfactual closer to the exact ground-truth counterfactual than the input is?

    python benchmarks/gt_check.py bundles/brain_mri_counterfactual --n 10 --steps 25 --drifts 0 0.05
Prints mean L1 and SSIM (cf vs GT, input vs GT) per drift and setting.
"""

import argparse
import json
from pathlib import Path

import torch

from monai_ld.evaluation import ground_truth_error
from monai_ld.evaluation.evaluator import load_counterfactual_pairs
from monai_ld.pipeline import CounterfactualPipeline

p = argparse.ArgumentParser()
p.add_argument("bundle")
p.add_argument("--n", type=int, default=10)
p.add_argument("--steps", type=int, default=25)
p.add_argument("--drifts", type=float, nargs="+", default=[0.0])
p.add_argument("--strengths", type=float, nargs="+", default=[None])
p.add_argument("--guidance", type=float, default=None)
p.add_argument("--composition", default=None)
a = p.parse_args()
torch.set_num_threads(2)
b = Path(a.bundle)
pipe = CounterfactualPipeline.from_checkpoint(b / "models" / "model.pt")
pairs = load_counterfactual_pairs(b / "data" / "manifest.csv", pipe.model.meta["preprocessing"], pipe.encoder, "test", a.n)
x = torch.stack([q["image"] for q in pairs]).float()
gt = torch.stack([q["ground_truth"] for q in pairs]).float()
for strength in a.strengths:
    for d in a.drifts:
        cfs, recs = [], []
        for q in pairs:
            plan = pipe.resolve({k: q["target"][k] for k in q["intervened"]}, q["source"], drift=d, strength=strength,
                                num_inference_steps=a.steps, guidance=a.guidance, composition=a.composition)
            out = pipe.edit(q["image"][None].float(), plan)
            cfs.append(out.image[0]), recs.append(out.reconstruction[0])
        res = ground_truth_error(torch.stack(cfs), gt, x)
        rec = ground_truth_error(torch.stack(recs), gt, x)
        print(json.dumps({"drift": d, "strength": strength or pipe.defaults["strength"], "n": len(pairs), "steps": a.steps,
                          "cf_l1": round(res["counterfactual"]["l1"], 4), "cf_ssim": round(res["counterfactual"]["ssim"], 4),
                          "input_l1": round(res["input"]["l1"], 4), "input_ssim": round(res["input"]["ssim"], 4),
                          "recon_l1": round(rec["counterfactual"]["l1"], 4), "recon_ssim": round(rec["counterfactual"]["ssim"], 4),
                          "fraction_closer_than_input": res["fraction_closer_than_input"]}), flush=True)
