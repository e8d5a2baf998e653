"""Does the campaign's diffusion UNet use the attributes? Two cheap checks on val, for any checkpoint.

1. Diffusion classifier: for each val subject, the denoising loss (fixed noise, t = 100..500) under each diagnosis
   with its own age and sex; the predicted diagnosis is the class with the lowest loss. A network that ignores the
   condition scores near the majority-class rate or below it. Weak: the condition moves a small part of the image,
   so its share of the loss is ~1e-5 and drowns in noise-draw variance.
2. Direction alignment (the sensitive one): on val ground-truth pairs (x, exact counterfactual x'), noise x's latent
   to t and ask the UNet for its clean-latent estimate under the target and under the source attributes; the
   difference is the change the model attributes to the intervention. Its cosine with the true latent change
   E(x') - E(x), per pair, against the same cosine with another pair's true change (chance: ~0 +- 1/sqrt(latent
   size)). What an edit needs is this alignment clearly above chance.

    python benchmarks/condition_check.py [--state bundles/brain_mri_counterfactual/campaign/diffusion.state.pt] [--n 24]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from monai_ld import bundle_support
from monai_ld.campaign import _latents, alignment_pairs, campaign_autoencoder, condition_alignment
from monai_ld.conditioning import AttributeEncoder
from monai_ld.evaluation.pairs import load_counterfactual_pairs
from monai_ld.networks.presets import build_scheduler, build_unet

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brain_mri_counterfactual"
TIMESTEPS = (100, 200, 300, 400, 500)


def _config() -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle_support.config_files(BUNDLE, "campaign.json"))
    parser["bundle_root"] = str(BUNDLE)
    return {k: parser.get_parsed_content(k) for k in ("attributes", "preprocessing_spec", "manifest", "campaign_dir")}


def classify(unet, scheduler, enc, cfg, latents, samples, rows, draws: int) -> None:
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
            for _ in range(draws):
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
    print(f"1. {len(rows)} val subjects {dict((c, truth.count(c)) for c in classes)}: diagnosis from the denoising loss: "
          f"accuracy {acc:.2f} (majority class {majority:.2f}); mean loss under the other diagnoses minus under the true "
          f"one {float(gap.mean()) / (len(TIMESTEPS) * draws):.2e}, > 0 for {float((gap > 0).float().mean()):.2f} of subjects")


def align(unet, scheduler, enc, cfg, ae, sf: float, n_pairs: int) -> None:
    pairs = load_counterfactual_pairs(cfg["manifest"], cfg["preprocessing_spec"], enc, "val", n_pairs)[:n_pairs]
    lat = alignment_pairs(ae, pairs, enc, "cpu", sf)
    groups = {n: lat["groups"].count(n) for n in sorted(set(lat["groups"]))}
    m = condition_alignment(unet, scheduler, lat)
    # chance: the same network's change against the true change of the NEXT pair (changes share a location, so this
    # is not 0 for a fixed response direction: the bar is the gap to it, and its trend across checkpoints)
    shuffled = condition_alignment(unet, scheduler, {**lat, "true": lat["true"].roll(1, 0)})
    print(f"2. {len(pairs)} val ground-truth pairs {groups}: mean cosine of the model's change (target minus source "
          f"condition, clean-latent estimate at t = 100, 250, 500) with the true latent change:")
    for k, v in m.items():
        print(f"   {k}: {v:.4f} (against the next pair's true change: {shuffled[k]:.4f})")
    for t in (50, 100, 250, 500):  # where in the noise range the response lives
        mt = condition_alignment(unet, scheduler, lat, timesteps=(t,))
        print(f"   t = {t}: " + ", ".join(f"{k} {v:.4f}" for k, v in mt.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", default=str(BUNDLE / "campaign" / "diffusion.state.pt"))
    p.add_argument("--n", type=int, default=24, help="val subjects for the classifier (default 24; 0 skips it)")
    p.add_argument("--pairs", type=int, default=24, help="val ground-truth pairs for the alignment (default 24; 0 skips)")
    p.add_argument("--draws", type=int, default=2, help="noise draws per timestep (default 2)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = _config()
    state = torch.load(a.state, map_location="cpu", weights_only=True)
    meta = state["meta"]
    sf = float(meta["scale_factor"])
    ae = campaign_autoencoder(cfg["campaign_dir"])
    unet = build_unet(meta["unet"])
    unet.load_state_dict(state.get("ema") or state["network"])
    unet.eval()
    scheduler = build_scheduler(meta["scheduler"])
    enc = AttributeEncoder(cfg["attributes"])
    print(f"{a.state}: iteration {state['trainer']['iteration']}")
    if a.n:
        samples = bundle_support.load_samples(cfg["manifest"], "val", cfg["preprocessing_spec"], cfg["attributes"], limit=a.n)
        rows = [r for r in csv.DictReader(open(cfg["manifest"])) if r.get("split") == "val" and not r.get("counterfactual_of")][: a.n]
        latents, _ = _latents(ae, samples, "cpu", sf)
        classify(unet, scheduler, enc, cfg, latents, samples, rows, a.draws)
    if a.pairs:
        align(unet, scheduler, enc, cfg, ae, sf, a.pairs)


if __name__ == "__main__":
    main()
