"""Does the campaign's diffusion UNet use the diagnosis? A diffusion classifier on val, cheap enough for any checkpoint.

For each val subject, the denoising loss (fixed noise, t = 100..500) under each diagnosis with its own age and sex;
the predicted diagnosis is the class with the lowest loss. A network that ignores the condition scores near the
majority-class rate or below it; one that can edit CN -> AD has to score well above it first.

    python benchmarks/condition_check.py [--state bundles/brain_mri_counterfactual/campaign/diffusion.state.pt] [--n 24]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from monai_ld import bundle_support
from monai_ld.campaign import _latents, campaign_autoencoder
from monai_ld.conditioning import AttributeEncoder
from monai_ld.networks.presets import build_scheduler, build_unet

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brain_mri_counterfactual"
TIMESTEPS = (100, 200, 300, 400, 500)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", default=str(BUNDLE / "campaign" / "diffusion.state.pt"))
    p.add_argument("--n", type=int, default=24, help="val subjects (default 24)")
    p.add_argument("--draws", type=int, default=2, help="noise draws per timestep (default 2)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = json.loads((BUNDLE / "configs" / "campaign.json").read_text())
    ph = cfg["phantoms"]
    manifest = bundle_support.ensure_phantoms(str(BUNDLE / "data"), "brain", ph["n"], ph["size"], ph["seed"],
                                              ph["counterfactual_splits"])
    samples = bundle_support.load_samples(manifest, "val", cfg["preprocessing"], cfg["attributes"], limit=a.n)
    rows = [r for r in csv.DictReader(open(manifest)) if r.get("split") == "val" and not r.get("counterfactual_of")][: a.n]
    state = torch.load(a.state, map_location="cpu", weights_only=True)
    meta = state["meta"]
    latents, _ = _latents(campaign_autoencoder(BUNDLE / "campaign"), samples, "cpu", float(meta["scale_factor"]))
    unet = build_unet(meta["unet"])
    unet.load_state_dict(state.get("ema") or state["network"])
    unet.eval()
    scheduler = build_scheduler(meta["scheduler"])
    enc = AttributeEncoder(cfg["attributes"])
    classes = next(s["classes"] for s in cfg["attributes"] if s["name"] == "diagnosis")
    shape = samples[0]["condition"].shape
    cond = {c: torch.stack([enc.encode({"age": float(r["age"]), "sex": r["sex"], "diagnosis": c}).reshape(shape)
                            for r in rows]) for c in classes}
    truth = [r["diagnosis"] for r in rows]
    # the true-class codes must be what training saw
    assert torch.allclose(torch.stack([cond[t][i] for i, t in enumerate(truth)]), torch.stack([s["condition"] for s in samples]))
    z = torch.stack([x["image"] for x in latents])
    g = torch.Generator().manual_seed(7)
    loss = torch.zeros(len(rows), len(classes))
    with torch.no_grad():
        for t in TIMESTEPS:
            for _ in range(a.draws):
                noise = torch.randn(z.shape, generator=g)
                ts = torch.full((len(rows),), t)
                noisy = scheduler.add_noise(z, noise, ts)
                for j, c in enumerate(classes):
                    loss[:, j] += ((unet(noisy, timesteps=ts, context=cond[c]) - noise) ** 2).mean(dim=(1, 2, 3, 4))
    true_idx = torch.tensor([classes.index(t) for t in truth])
    acc = float((loss.argmin(1) == true_idx).float().mean())
    majority = max(truth.count(c) for c in classes) / len(truth)
    own = loss.gather(1, true_idx[:, None])[:, 0]
    gap = (loss.sum(1) - own) / (len(classes) - 1) - own  # > 0: the true diagnosis explains the image best
    print(f"{a.state}: iteration {state['trainer']['iteration']}, {len(rows)} val subjects {dict((c, truth.count(c)) for c in classes)}")
    print(f"diagnosis from the denoising loss: accuracy {acc:.2f} (majority class {majority:.2f}); mean loss under the "
          f"other diagnoses minus under the true one {float(gap.mean()) / (len(TIMESTEPS) * a.draws):.2e}, "
          f"> 0 for {float((gap > 0).float().mean()):.2f} of subjects")


if __name__ == "__main__":
    main()
