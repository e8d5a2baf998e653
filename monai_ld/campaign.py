"""A bundle's training campaign: autoencoder, then latent diffusion, each resumable across sessions under a budget.

``monai-ld train --bundle brain --stage all --campaign --budget-min 150`` runs the bundle's ``configs/campaign.json``,
which calls :func:`run_campaign`. The state lives in ``<bundle>/campaign/{autoencoder,diffusion}.state.pt`` (one file
per network, overwritten, committed), the curve in ``<bundle>/docs/training_log.csv``. Splits: both networks train on
``train``; every checkpoint is validated on ``val`` (reconstruction, the latent-oracle ceiling on val's ground-truth
pairs, the denoising loss), so ``test`` stays untouched until the final report. The shipped ``models/`` weights are
replaced only by an explicit :func:`export_model` once the campaign's model meets the bundle's bars.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import DiffusionInferer, SimpleInferer
from monai.transforms import RandSpatialCropd

from .bundle_support import ensure_phantoms, load_samples
from .conditioning import NULL_VALUE, AttributeEncoder
from .engines.campaign import CampaignLog, RandomBatches, RngState, StagePlan, grow_state, read_state, train_stage
from .engines.losses import AutoencoderKLLoss
from .engines.prepare_batch import AutoencoderPrepareBatch, LatentDriftPrepareBatch
from .engines.training import AUTOENCODER_FORMAT, encode_latents, scale_factor_from_latents
from .networks.model import ConditionalLDM, atomic_torch_save
from .networks.presets import build_autoencoder, build_scheduler, build_unet
from .settings import EditSettings

__all__ = ["run_campaign", "campaign_autoencoder", "export_autoencoder", "export_model", "condition_alignment",
           "alignment_pairs", "STAGES"]

STAGES = ("autoencoder", "diffusion", "all")
logger = logging.getLogger("monai_ld.campaign")


def _plan(section: Mapping[str, Any]) -> StagePlan:
    keys = ("total_iterations", "lr", "batch_size", "warmup", "final_lr_fraction", "ema_decay")
    return StagePlan(**{k: section[k] for k in keys if k in section})


def campaign_autoencoder(campaign_dir: str | Path) -> torch.nn.Module:
    """The campaign's autoencoder (EMA weights when it keeps them), from its state file, in eval mode."""
    state = read_state(Path(campaign_dir) / "autoencoder.state.pt")
    if state is None:
        raise FileNotFoundError(f"no autoencoder state in {campaign_dir}: run the campaign's autoencoder stage first")
    ae = build_autoencoder(state["meta"]["config"])
    ae.load_state_dict(state.get("ema") or state["network"])
    return ae.eval()


@torch.no_grad()
def _autoencoder_metrics(ae: torch.nn.Module, val_images: torch.Tensor, pairs: Sequence[Mapping[str, Any]]) -> dict:
    """Val reconstruction L1 and, on val's ground-truth pairs, the ceiling the autoencoder allows: the input's L1 to
    the truth next to ``x + D(E(gt)) - D(E(x))`` (anywhere, and kept inside the true change grown by 2 voxels, as
    ``benchmarks/gt_check.py --ceilings`` computes it)."""
    dev = next(ae.parameters()).device

    def auto(x):
        return torch.cat([ae.decode(ae.encode(x[i : i + 1].to(dev))[0]).cpu() for i in range(x.shape[0])])

    out = {"val_recon_l1": float((auto(val_images) - val_images).abs().mean())}
    if pairs:
        x = torch.stack([p["image"] for p in pairs]).float()
        gt = torch.stack([p["ground_truth"] for p in pairs]).float()
        oracle = x + auto(gt) - auto(x)
        grow = torch.nn.functional.max_pool3d if x.ndim == 5 else torch.nn.functional.max_pool2d
        region = grow(((gt - x).abs() > 0.01).float(), kernel_size=5, stride=1, padding=2)
        out.update(val_input_l1=float((x - gt).abs().mean()), val_oracle_l1=float((oracle - gt).abs().mean()),
                   val_oracle_region_l1=float((x + region * (oracle - x) - gt).abs().mean()))
    return out


def _val_pairs(manifest: str, preprocessing: Mapping[str, Any], encoder: AttributeEncoder, n: int) -> list[dict]:
    from .evaluation import EvaluationError
    from .evaluation.evaluator import load_counterfactual_pairs

    try:
        return load_counterfactual_pairs(manifest, preprocessing, encoder, "val", n)[:n] if n else []
    except EvaluationError as e:  # a data set without val pairs still trains; the log says why the ceiling is missing
        logger.warning("no val ground-truth pairs (%s); the ceiling is not logged", e)
        return []


def _train_autoencoder(ctx: dict, section: Mapping[str, Any], deadline: float) -> dict:
    plan = _plan(section)
    samples = load_samples(ctx["manifest"], "train", ctx["preprocessing"], ctx["attributes"])
    val = load_samples(ctx["manifest"], "val", ctx["preprocessing"], ctx["attributes"], limit=section.get("val_images", 8))
    pairs = _val_pairs(ctx["manifest"], ctx["preprocessing"], ctx["encoder"], int(section.get("val_pairs", 8)))
    val_images = torch.stack([s["image"] for s in val]).float()
    seed = ctx["seed"]
    torch.manual_seed(seed)  # initial weights (a resumed run loads them instead)
    net = build_autoencoder(dict(section["config"]))
    g = torch.Generator().manual_seed(seed)
    crop = RandSpatialCropd("image", roi_size=tuple(section["patch_size"]), random_size=False) if section.get("patch_size") else None
    states = {}
    if crop is not None:
        crop.set_random_state(seed)
        states = {"crop": crop.cropper.R}
    return train_stage("autoencoder", net, RandomBatches(samples, plan.batch_size, g, crop),
                       AutoencoderKLLoss(float(section.get("kl_weight", 1e-6)), "l1", 0.0, int(section["config"]["spatial_dims"])),
                       AutoencoderPrepareBatch(), SimpleInferer(), plan, ctx["dir"] / "autoencoder.state.pt", ctx["log"],
                       RngState({"batches": g}, states), deadline,
                       validate=lambda ae: _autoencoder_metrics(ae, val_images, pairs), meta={"config": dict(section["config"])},
                       **ctx["save"])


def _latents(ae: torch.nn.Module, samples: Sequence[Mapping[str, Any]], device: str, sf: float | None) -> tuple[list[dict], float]:
    """Posterior-mean latents of ``samples``, scaled by ``sf`` (or ``1/std`` of these latents when ``sf`` is None)."""
    z = encode_latents(ae, samples, device=device)
    sf = scale_factor_from_latents(z) if sf is None else sf
    return [{"image": zi * sf, "condition": s["condition"]} for zi, s in zip(z, samples)], sf


def _autoencoder_iteration(campaign_dir: Path) -> int:
    state = read_state(campaign_dir / "autoencoder.state.pt")
    return -1 if state is None else int(state["trainer"]["iteration"])


def _denoising_loss(unet: torch.nn.Module, scheduler: Any, val: Sequence[Mapping[str, Any]], seed: int = 1234) -> dict:
    """Val MSE of the noise prediction at fixed noise and 4 fixed timesteps per latent, under the true condition:
    comparable across checkpoints (the training loss is not: random timesteps, dropped conditions).

    ``val_condition_gain`` is the same loss under the null condition (the one classifier-free guidance contrasts
    with) minus the loss under the true one: above 0 only once the network uses the attributes, which an edit needs."""
    g = torch.Generator().manual_seed(seed)
    dev = next(unet.parameters()).device
    z = torch.stack([v["image"] for v in val]).to(dev)
    cond = torch.stack([v["condition"] for v in val]).to(dev)
    losses, null = [], []
    with torch.no_grad():
        for t in (50, 250, 500, 750):
            noise = torch.randn(z.shape, generator=g).to(dev)  # drawn on the CPU: the same numbers on any device
            ts = torch.full((z.shape[0],), t, dtype=torch.long, device=dev)
            noisy = scheduler.add_noise(z, noise, ts)
            losses.append(float(((unet(noisy, timesteps=ts, context=cond) - noise) ** 2).mean()))
            null.append(float(((unet(noisy, timesteps=ts, context=torch.full_like(cond, NULL_VALUE)) - noise) ** 2).mean()))
    return {"val_loss": sum(losses) / len(losses), **{f"val_loss_t{t}": v for t, v in zip((50, 250, 500, 750), losses)},
            "val_condition_gain": (sum(null) - sum(losses)) / len(losses)}


def condition_alignment(unet: torch.nn.Module, scheduler: Any, pairs: Mapping[str, Any],
                        timesteps: Sequence[int] = (100, 250, 500), seed: int = 4321) -> dict:
    """Does the network move the image the way the intervention does? ``pairs``: val ground-truth pairs as latents,
    ``{"z": (N, C, *spatial) factual, "true": (N, C, *spatial) E(exact counterfactual) - E(factual), "source",
    "target": (N, 1, dim) condition codes, "groups": [intervened attribute per pair]}``.

    At each ``t``, the factual latent is noised (fixed noise) and the UNet's clean-latent estimate under the target
    minus under the source condition is the change it attributes to the intervention. Returns the mean cosine of that
    change with the true one per group (``val_align_<attribute>``; 0 for a network ignoring the attributes, and for
    one whose change goes elsewhere) and ``val_change_ratio`` (median norm of the model's change over the true one's)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(unet.parameters()).device
    z, true = pairs["z"].to(dev), pairs["true"].to(dev)
    cos = torch.zeros(z.shape[0], device=dev)
    ratio = torch.zeros(z.shape[0], device=dev)
    with torch.no_grad():
        for t in timesteps:
            ab = scheduler.alphas_cumprod[t].item()
            noise = torch.randn(z.shape, generator=g).to(dev)
            ts = torch.full((z.shape[0],), t, dtype=torch.long, device=dev)
            noisy = scheduler.add_noise(z, noise, ts)
            d_eps = unet(noisy, timesteps=ts, context=pairs["target"].to(dev)) - unet(noisy, timesteps=ts,
                                                                                       context=pairs["source"].to(dev))
            change = (-((1.0 - ab) / ab) ** 0.5 * d_eps).flatten(1)  # x0 = (z_t - sqrt(1 - ab) eps) / sqrt(ab)
            cos += torch.nn.functional.cosine_similarity(change, true.flatten(1), dim=1) / len(timesteps)
            ratio += change.norm(dim=1) / true.flatten(1).norm(dim=1).clamp_min(1e-12) / len(timesteps)
    out = {f"val_align_{name}": float(cos[[i for i, n in enumerate(pairs["groups"]) if n == name]].mean())
           for name in sorted(set(pairs["groups"]))}
    return {**out, "val_change_ratio": float(ratio.median())}


def alignment_pairs(ae: torch.nn.Module, pairs: Sequence[Mapping[str, Any]], encoder: AttributeEncoder, device: str,
                    sf: float) -> dict:
    """:func:`condition_alignment`'s input from ground-truth pairs (:func:`~.evaluation.pairs.load_counterfactual_pairs`)."""
    if not pairs:
        return {"groups": []}
    code = lambda a: encoder.encode(a).reshape(1, -1).float()  # noqa: E731
    zx, _ = _latents(ae, [{"image": p["image"], "condition": code(p["source"])} for p in pairs], device, sf)
    zg, _ = _latents(ae, [{"image": p["ground_truth"], "condition": code(p["target"])} for p in pairs], device, sf)
    z = torch.stack([x["image"] for x in zx]).cpu()
    return {"z": z, "true": torch.stack([x["image"] for x in zg]).cpu() - z,
            "source": torch.stack([code(p["source"]) for p in pairs]), "target": torch.stack([code(p["target"]) for p in pairs]),
            "groups": ["+".join(p["intervened"]) or "none" for p in pairs]}


def _grow_unet(path: Path, prior: dict, unet: torch.nn.Module, ucfg: dict) -> None:
    """The config asks for the saved UNet plus a condition embedding (``"condition_embedding": true`` added): rewrite
    the state for it (:func:`grow_state`), training continues from the saved iteration. Any other change is an error."""
    was = dict(prior["meta"]["unet"])
    if {k: v for k, v in ucfg.items() if k != "condition_embedding"} != was or not ucfg.get("condition_embedding"):
        raise ValueError(f"the diffusion UNet config changed since {path} was saved ({was} -> {ucfg}); only adding "
                         f'"condition_embedding": true continues a stage. Move the file away to start the stage afresh')
    grown = grow_state(prior, build_unet(was), unet)
    it = int(prior["trainer"]["iteration"])
    grown["meta"] = {**prior["meta"], "unet": ucfg, "condition_embedding_from": it}
    atomic_torch_save(grown, path)
    logger.warning("diffusion: the UNet gained a condition embedding at iteration %d (state rewritten; the new layer "
                   "starts at zero, so the network computes what it did until training moves it)", it)


def _pair_samples(ctx: dict, spec: Mapping[str, Any], ae: torch.nn.Module, sf: float) -> list[dict]:
    """Training samples from longitudinal pairs (``diffusion.pairs``): ``n`` subjects of another seed's phantoms, each
    rendered under its own and one changed set of attributes (every row is training data; none is a val or test
    identity). A pair gives four samples: each image under its own condition, and each image's latent under the
    other's condition with the other as its ``counterfactual`` (see :class:`LatentDriftPrepareBatch`)."""
    from .evaluation.pairs import load_counterfactual_pairs

    m = ensure_phantoms(str(spec["data_dir"]), spec.get("kind", "brain"), int(spec["n"]), int(spec["size"]),
                        int(spec["seed"]), ("train", "val", "test"))
    lat = alignment_pairs(ae, load_counterfactual_pairs(m, ctx["preprocessing"], ctx["encoder"], None), ctx["encoder"],
                          ctx["save"]["device"], sf)
    out = []
    for z, d, source, target in zip(lat["z"], lat["true"], lat["source"], lat["target"]):
        zc = z + d
        out += [{"image": z, "condition": source}, {"image": zc, "condition": target},
                {"image": z, "condition": target, "counterfactual": zc}, {"image": zc, "condition": source, "counterfactual": z}]
    return out


def _pair_set(spec: Mapping[str, Any] | None) -> dict:
    """What defines a pair set (kind, n, size, seed) for the state's record; ``data_dir`` is only the render cache's
    place, which differs between clones."""
    return {k: v for k, v in dict(spec or {}).items() if k != "data_dir"}


def _own_counterfactual(sample: dict) -> dict:
    """A row without a partner is its own counterfactual (zero shift: the plain denoising target)."""
    return sample if "counterfactual" in sample else {**sample, "counterfactual": sample["image"]}


def _train_diffusion(ctx: dict, section: Mapping[str, Any], deadline: float) -> dict:
    plan = _plan(section)
    ae = campaign_autoencoder(ctx["dir"])
    prior = read_state(ctx["dir"] / "diffusion.state.pt")
    ae_it = _autoencoder_iteration(ctx["dir"])
    if prior is not None and int(prior["meta"].get("autoencoder_iteration", ae_it)) != ae_it:
        raise ValueError(f"the diffusion state was trained on the autoencoder at iteration "
                         f"{prior['meta']['autoencoder_iteration']}, but the autoencoder is now at {ae_it}: its latents "
                         f"changed. Move {ctx['dir'] / 'diffusion.state.pt'} away to start the diffusion stage afresh")
    samples = load_samples(ctx["manifest"], "train", ctx["preprocessing"], ctx["attributes"])
    extra = section.get("train_extra")
    if extra:  # more training subjects: other identities (another seed), every row of that set is training data
        m = ensure_phantoms(str(extra["data_dir"]), extra.get("kind", "brain"), int(extra["n"]), int(extra["size"]),
                            int(extra["seed"]), ())
        samples += load_samples(m, None, ctx["preprocessing"], ctx["attributes"])
    val = load_samples(ctx["manifest"], "val", ctx["preprocessing"], ctx["attributes"], limit=section.get("val_images", 16))
    # the scale is fixed at the stage's start (the model learnt it); the latents are encoded once per session
    sf = float(prior["meta"]["scale_factor"]) if prior is not None else None
    train_lat, sf = _latents(ae, samples, ctx["save"]["device"], sf)
    val_lat, _ = _latents(ae, val, ctx["save"]["device"], sf)
    align = alignment_pairs(ae, _val_pairs(ctx["manifest"], ctx["preprocessing"], ctx["encoder"],
                                           int(section.get("val_pairs", 12))), ctx["encoder"], ctx["save"]["device"], sf)
    del samples, val
    pairs = section.get("pairs")
    if pairs:
        paired = _pair_samples(ctx, pairs, ae, sf)
        logger.info("diffusion: %d paired samples from %d longitudinal pairs", len(paired), len(paired) // 4)
        train_lat += paired
    seed = ctx["seed"]
    torch.manual_seed(seed)
    ucfg = dict(section["unet"])
    unet = build_unet(ucfg)
    if prior is not None and dict(prior["meta"]["unet"]) != ucfg:
        _grow_unet(ctx["dir"] / "diffusion.state.pt", prior, unet, ucfg)
    if prior is not None and pairs and _pair_set(prior["meta"].get("pairs")) != _pair_set(pairs):  # joins or changes
        state = read_state(ctx["dir"] / "diffusion.state.pt")
        it = int(state["trainer"]["iteration"])
        history = list(state["meta"].get("pairs_history", []))
        if "pairs" in state["meta"]:  # the set it trained on until now stays in the record
            history.append({**_pair_set(state["meta"]["pairs"]), "from": int(state["meta"].get("pairs_from", 0)),
                            "to": it})
        state["meta"] = {**state["meta"], "pairs": _pair_set(pairs), "pairs_from": it,
                         **({"pairs_history": history} if history else {})}
        atomic_torch_save(state, ctx["dir"] / "diffusion.state.pt")
        logger.warning("diffusion: paired counterfactual supervision (%s) from iteration %d", dict(pairs), it)
    scheduler = build_scheduler(dict(section["scheduler"]))
    g_batches, g_noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    prepare = LatentDriftPrepareBatch(scheduler, drift=float(section.get("drift", 0.0)),
                                      drift_target=section.get("drift_target", "shifted"),
                                      condition_dropout=float(section.get("condition_dropout", 0.15)), generator=g_noise,
                                      counterfactual_name="counterfactual" if pairs else None)
    meta = {"train_samples": len(train_lat), "autoencoder_iteration": ae_it, "unet": ucfg,
            "scheduler": dict(section["scheduler"]), "scale_factor": sf,
            "drift": float(section.get("drift", 0.0)), "drift_target": section.get("drift_target", "shifted"),
            **({"pairs": _pair_set(pairs)} if pairs else {})}
    batches = RandomBatches(train_lat, plan.batch_size, g_batches, _own_counterfactual if pairs else None)
    return train_stage("diffusion", unet, batches, torch.nn.MSELoss(), prepare,
                       DiffusionInferer(scheduler), plan, ctx["dir"] / "diffusion.state.pt", ctx["log"],
                       RngState({"batches": g_batches, "noise": g_noise}), deadline,
                       validate=lambda net: {**_denoising_loss(net, scheduler, val_lat),
                                             **(condition_alignment(net, scheduler, align) if align["groups"] else {})},
                       meta=meta,
                       optimizer_state_dtype=section.get("optimizer_state_dtype"), autocast=section.get("autocast"),
                       **ctx["save"])


def run_campaign(
    bundle_root: str,
    manifest: str,
    preprocessing: Mapping[str, Any],
    attributes: Sequence[Mapping[str, Any]],
    autoencoder: Mapping[str, Any],
    diffusion: Mapping[str, Any],
    stage: str = "all",
    budget_min: float = 60.0,
    save_every_min: float = 10.0,
    save_every_iterations: int | None = None,
    threads: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    campaign_dir: str | None = None,
    log_csv: str | None = None,
) -> dict:
    """Run (or resume) the campaign's stages in order until each is complete or ``budget_min`` is spent.

    ``stage="all"`` trains the autoencoder to its plan's end, then the diffusion model; a stage that is complete is
    skipped. Returns ``{stage: {"iteration", "complete", "seconds"}}``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if budget_min <= 0:
        raise ValueError(f"budget_min must be > 0, got {budget_min}")
    deadline = time.monotonic() + 60.0 * float(budget_min)
    if threads:
        torch.set_num_threads(int(threads))
    root = Path(bundle_root)
    cdir = Path(campaign_dir) if campaign_dir else root / "campaign"
    cdir.mkdir(parents=True, exist_ok=True)
    enc = AttributeEncoder(attributes)
    ctx = {"manifest": manifest, "preprocessing": dict(preprocessing), "attributes": list(attributes), "encoder": enc,
           "seed": int(seed), "dir": cdir,
           "log": CampaignLog(log_csv or root / "docs" / "training_log.csv", root / "runs" / "campaign" / "tensorboard"),
           "save": {"save_every_s": 60.0 * float(save_every_min), "save_every_iterations": save_every_iterations,
                    "device": device}}
    done: dict[str, Any] = {}
    if stage in ("autoencoder", "all"):
        done["autoencoder"] = {k: v for k, v in _train_autoencoder(ctx, autoencoder, deadline).items() if k != "meta"}
        if stage == "all" and not done["autoencoder"]["complete"]:
            return done
    if stage in ("diffusion", "all"):
        why = _ceiling_not_met(cdir) if diffusion.get("require_ceiling", True) else None
        if why:  # a diffusion model cannot beat what its autoencoder cannot carry: do not spend compute on it yet
            logger.warning("campaign: the diffusion stage waits: %s", why)
            done["diffusion"] = {"skipped": why}
            return done
        if deadline - time.monotonic() < 60.0 * float(diffusion.get("setup_min", 15)):
            done["diffusion"] = {"skipped": "less budget left than the diffusion stage's setup (data, latents) takes"}
            return done
        done["diffusion"] = {k: v for k, v in _train_diffusion(ctx, diffusion, deadline).items() if k != "meta"}
    logger.info("campaign: %s", done)
    return done


def _ceiling_not_met(campaign_dir: Path) -> str | None:
    """Why the autoencoder is not good enough for the diffusion stage, or None: at its last validation the latent
    oracle inside the true change (``val_oracle_region_l1``) must be closer to the ground truth than the input is."""
    state = read_state(campaign_dir / "autoencoder.state.pt")
    if state is None:
        return "no autoencoder has been trained"
    m = state.get("metrics") or {}
    if "val_oracle_region_l1" not in m:
        return "the autoencoder's ceiling was not measured (no val ground-truth pairs)"
    if m["val_oracle_region_l1"] >= m["val_input_l1"]:
        return (f"the autoencoder's ceiling on val pairs ({m['val_oracle_region_l1']:.5f}) is not below the input's L1 to "
                f"the ground truth ({m['val_input_l1']:.5f}); train it further (raise autoencoder.total_iterations) or "
                f"set diffusion.require_ceiling false")
    return None


def export_autoencoder(campaign_dir: str | Path, output: str | Path) -> Path:
    """The campaign's autoencoder as a ``train_autoencoder`` file (for ``gt_check.py --ceilings --autoencoder``)."""
    state = read_state(Path(campaign_dir) / "autoencoder.state.pt")
    if state is None:
        raise FileNotFoundError(f"no autoencoder state in {campaign_dir}")
    ae = campaign_autoencoder(campaign_dir)
    record = {"iterations": int(state["trainer"]["iteration"]), "seconds": round(float(state["seconds"]), 1),
              "plan": state["plan"], "campaign": True}
    return atomic_torch_save({"format": AUTOENCODER_FORMAT, "config": state["meta"]["config"],
                              "state_dict": ae.state_dict(), "record": record}, output)


def export_model(campaign_dir: str | Path, output: str | Path, attributes: Sequence[Mapping[str, Any]],
                 preprocessing: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Path:
    """The campaign's autoencoder + diffusion UNet (EMA weights when kept) as one :class:`ConditionalLDM` file."""
    ae_state, d_state = (read_state(Path(campaign_dir) / f"{n}.state.pt") for n in ("autoencoder", "diffusion"))
    if ae_state is None or d_state is None:
        raise FileNotFoundError(f"{campaign_dir} lacks a finished autoencoder or any diffusion state")
    m = d_state["meta"]
    if int(m.get("autoencoder_iteration", ae_state["trainer"]["iteration"])) != int(ae_state["trainer"]["iteration"]):
        raise ValueError(f"the diffusion model was trained on the autoencoder at iteration {m['autoencoder_iteration']}, "
                         f"not on the current one ({ae_state['trainer']['iteration']}): exporting them together is wrong")
    record = {k: {"iterations": int(s["trainer"]["iteration"]), "seconds": round(float(s["seconds"]), 1), "plan": s["plan"]}
              for k, s in (("autoencoder", ae_state), ("diffusion", d_state))}
    model = ConditionalLDM(ae_state["meta"]["config"], m["unet"], list(attributes), scale_factor=m["scale_factor"],
                           scheduler=m["scheduler"], drift=m["drift"], drift_target=m["drift_target"],
                           meta={"preprocessing": dict(preprocessing), "defaults": EditSettings.given(defaults), "campaign": record})
    model.autoencoder.load_state_dict(campaign_autoencoder(campaign_dir).state_dict())
    model.unet.load_state_dict(d_state.get("ema") or d_state["network"])
    return model.save(output)
