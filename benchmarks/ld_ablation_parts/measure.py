"""Fine-tuning, sampling, counterfactuals and the metrics of one grid cell (library calls, no new metrics)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from monai_ld.engines.training import finetune
from monai_ld.evaluation import downstream_auc, effectiveness_from_images, extract_features, fid, ground_truth_error, kid
from monai_ld.evaluation.drift_search import mean_image_l1, search_drift
from monai_ld.inferers import make_inferer
from monai_ld.networks.model import ConditionalLDM

logging.getLogger("monai_ld.train").setLevel(logging.WARNING)  # one line per checkpoint_every otherwise

FINDING = "cardiomegaly"  # the downstream / counterfactual attribute: the visible, identity-independent finding


def run_finetune(samples, base: Path, out: Path, scheme: str, drift: float, seed: int, cfg) -> ConditionalLDM:
    """Fine-tune, or reuse ``out`` when it exists (the file name holds scheme, seed and δ: the work dir is a cache)."""
    if out.is_file():
        return ConditionalLDM.load(out)
    work = out.with_suffix(".work")
    shutil.rmtree(work, ignore_errors=True)  # never resume a stale run of another configuration
    with torch.enable_grad():  # the δ search calls this from its (no-grad) generator
            finetune(samples, base, out, scheme=scheme, max_iterations=cfg.ft_iters, batch_size=cfg.ft_batch, lr=cfg.lr[scheme],
                 drift=drift, drift_target="shifted", checkpoint_every=10**9, resume=False, seed=seed, work_dir=work,
                 progress=False)
    shutil.rmtree(work, ignore_errors=True)
    return ConditionalLDM.load(out)


@torch.no_grad()
def generate(model: ConditionalLDM, rows: list[dict], drift: float, seed: int, steps: int, batch: int = 32) -> torch.Tensor:
    """Conditional samples for ``rows``; the noise depends only on ``seed`` (same noise for every δ and model)."""
    g = torch.Generator().manual_seed(seed)
    lat = int(model.autoencoder_config.get("latent_channels", 3))
    size = model.meta.get("preprocessing", {}).get("size", 128) // 4  # the autoencoder downsamples 4x
    noise = torch.randn(len(rows), lat, size, size, generator=g)
    inferer = make_inferer(model, num_inference_steps=steps, drift=drift)
    out = []
    for i in range(0, len(rows), batch):
        cond = model.condition(rows[i : i + batch], batch_size=len(rows[i : i + batch]))
        out.append(inferer.sample(noise[i : i + batch], model.autoencoder, model.unet, conditioning=cond, verbose=False))
    return torch.cat(out).clamp(0, 1)


@torch.no_grad()
def counterfactuals(model: ConditionalLDM, pairs: dict, drift: float, seed: int, cfg) -> torch.Tensor:
    """The bundle's default edit (paired composition, DiffEdit mask 0.4, strength 0.5, no CFG), δ while generating."""
    inferer = make_inferer(model, num_inference_steps=cfg.cf_steps, drift=drift)
    n = len(pairs["source_rows"])
    src = model.condition(pairs["source_rows"], batch_size=n)
    tgt = model.condition(pairs["target_rows"], batch_size=n)
    out = inferer.counterfactual(pairs["inputs"], model.autoencoder, model.unet, src, tgt, strength=0.5,
                                 guidance_scale=None, composition="paired", mask_threshold=0.4,
                                 generator=torch.Generator().manual_seed(seed))
    return out.image.clamp(0, 1)


class Judge:
    """Everything a cell is scored against: the oracle (effectiveness + the FID/KID feature network, trained on
    real target images only), the real target test images and the ground-truth pairs."""

    def __init__(self, oracle, test_images, test_rows, pairs, encoder, cfg):
        self.oracle, self.encoder, self.cfg = oracle, encoder, cfg
        self.test_images, self.test_rows, self.pairs = test_images, test_rows, pairs
        self.test_feats = extract_features(oracle, test_images)
        self.test_labels = torch.tensor([int(r[FINDING]) for r in test_rows])

    def realism(self, images: torch.Tensor, real_feats: torch.Tensor | None = None) -> dict:
        real = self.test_feats if real_feats is None else real_feats
        f = extract_features(self.oracle, images)
        k_mean, k_std = kid(real, f, subsets=100, subset_size=None, seed=0)
        return {"fid": fid(real, f), "kid": k_mean, "kid_subset_std": k_std}

    def cell(self, images: torch.Tensor, rows: list[dict], cf: torch.Tensor, seed: int) -> dict:
        out = self.realism(images)
        labels = torch.tensor([int(r[FINDING]) for r in rows])
        # the classifier sees 2x average-pooled (64²) images: cardiomegaly is a large structure, and it is 4x cheaper
        d = downstream_auc(F.avg_pool2d(images, 2), labels, F.avg_pool2d(self.test_images, 2), self.test_labels,
                           epochs=self.cfg.clf_epochs, seed=seed)
        out["auc"] = d["auc_synthetic"]
        eff = effectiveness_from_images(self.oracle, cf, self.pairs["target_rows"], self.encoder, attributes=[FINDING])
        out["effectiveness"] = eff[FINDING]["accuracy"]
        gt = ground_truth_error(cf, self.pairs["ground_truth"], self.pairs["inputs"])
        out["gt_l1"] = gt["counterfactual"]["l1"]
        out["gt_l1_input"] = gt["input"]["l1"]
        return out


def search_sampling_drift(model, rows, real_val, judge: Judge, drifts, seed, steps) -> dict:
    """The paper's grid search of δ, on the target validation split: objective = its Monte-Carlo L1 (mean generated
    vs mean real image); KID on the oracle features is recorded beside it."""
    real_f = extract_features(judge.oracle, real_val)

    def objective(images):
        return {"objective": mean_image_l1(images, real_val), **judge.realism(images, real_f)}

    return search_drift(lambda d: generate(model, rows, d, seed, steps), objective, drifts)
