"""A bundle's training campaign: autoencoder, latent diffusion, then the decoder alone, each resumable across
sessions under a budget.

``monai-ld train --bundle brain --stage all --campaign --budget-min 150`` runs the bundle's ``configs/campaign.json``,
which calls :func:`run_campaign`. The state lives in ``<bundle>/campaign/{autoencoder,diffusion,decoder}.state.pt`` (one
file per network, overwritten, committed), the curve in ``<bundle>/docs/training_log.csv``. The decoder stage fine-tunes
the autoencoder's decoding path with the encoder frozen: the latents, and with them the diffusion model, stay valid,
while the decoder learns to render more of what they carry. Splits: every network trains on ``train``; every checkpoint is validated on ``val`` (reconstruction, the latent-oracle ceiling on val's ground-truth
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
from .conditioning import AttributeEncoder
from .engines.campaign import CampaignLog, RandomBatches, RngState, StagePlan, grow_state, read_state, train_stage
from .engines.losses import AutoencoderKLLoss
from .engines.prepare_batch import AutoencoderPrepareBatch, LatentDriftPrepareBatch
from .engines.training import AUTOENCODER_FORMAT, encode_latents, scale_factor_from_latents
from .engines.validation import autoencoder_metrics, condition_alignment, denoising_loss
from .networks.model import ConditionalLDM, atomic_torch_save
from .networks.presets import build_autoencoder, build_scheduler, build_unet
from .settings import EditSettings

__all__ = ["run_campaign", "campaign_autoencoder", "export_autoencoder", "export_model", "condition_alignment",
           "alignment_pairs", "STAGES"]

STAGES = ("autoencoder", "diffusion", "decoder", "all")
logger = logging.getLogger("monai_ld.campaign")


def _plan(section: Mapping[str, Any]) -> StagePlan:
    keys = ("total_iterations", "lr", "batch_size", "warmup", "final_lr_fraction", "ema_decay")
    return StagePlan(**{k: section[k] for k in keys if k in section})


class Decoding(torch.nn.Module):
    """An autoencoder's decoding path, ``decoder(post_quant_conv(z))``, sharing its modules: what the decoder stage
    trains. Its ``state_dict`` keys are the autoencoder's own, so it loads into one (``strict=False``)."""

    def __init__(self, autoencoder: torch.nn.Module):
        super().__init__()
        self.post_quant_conv, self.decoder = autoencoder.post_quant_conv, autoencoder.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def _with_decoder(ae: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    missing, unexpected = ae.load_state_dict(dict(weights), strict=False)
    if unexpected or any(k.startswith(("decoder.", "post_quant_conv.")) for k in missing):
        raise ValueError(f"the decoder state does not fit the autoencoder ({(unexpected or missing)[:3]})")
    return ae


def campaign_autoencoder(campaign_dir: str | Path, decoder: bool = True) -> torch.nn.Module:
    """The campaign's autoencoder (EMA weights when it keeps them), from its state file, in eval mode; with the decoder
    stage's decoder when there is one and ``decoder`` (the encoder, hence every latent, is the same either way)."""
    state = read_state(Path(campaign_dir) / "autoencoder.state.pt")
    if state is None:
        raise FileNotFoundError(f"no autoencoder state in {campaign_dir}: run the campaign's autoencoder stage first")
    ae = build_autoencoder(state["meta"]["config"])
    ae.load_state_dict(state.get("ema") or state["network"])
    dec = read_state(Path(campaign_dir) / "decoder.state.pt") if decoder else None
    if dec is not None:
        if int(dec["meta"]["autoencoder_iteration"]) != int(state["trainer"]["iteration"]):
            raise ValueError(f"the decoder state in {campaign_dir} was fine-tuned from the autoencoder at iteration "
                             f"{dec['meta']['autoencoder_iteration']}, not the current {state['trainer']['iteration']}")
        _with_decoder(ae, dec.get("ema") or dec["network"])
    return ae.eval()


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
                       validate=lambda ae: autoencoder_metrics(ae, val_images, pairs), meta={"config": dict(section["config"])},
                       **ctx["save"])


def _train_samples(ctx: dict, extra: Mapping[str, Any] | None, extra_limit: int | None = None) -> list[dict]:
    """The train split's samples, plus (``extra``) the first ``extra_limit`` (default all) rows of another seed's
    phantoms: other identities, every row of that set training data."""
    samples = load_samples(ctx["manifest"], "train", ctx["preprocessing"], ctx["attributes"])
    if extra:
        m = ensure_phantoms(str(extra["data_dir"]), extra.get("kind", "brain"), int(extra["n"]), int(extra["size"]),
                            int(extra["seed"]), ())
        samples += load_samples(m, None, ctx["preprocessing"], ctx["attributes"], limit=extra_limit)
    return samples


def _latents(ae: torch.nn.Module, samples: Sequence[Mapping[str, Any]], device: str, sf: float | None) -> tuple[list[dict], float]:
    """Posterior-mean latents of ``samples``, scaled by ``sf`` (or ``1/std`` of these latents when ``sf`` is None)."""
    z = encode_latents(ae, samples, device=device)
    sf = scale_factor_from_latents(z) if sf is None else sf
    return [{"image": zi * sf, "condition": s["condition"]} for zi, s in zip(z, samples)], sf


def _autoencoder_iteration(campaign_dir: Path) -> int:
    state = read_state(campaign_dir / "autoencoder.state.pt")
    return -1 if state is None else int(state["trainer"]["iteration"])


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
    samples = _train_samples(ctx, section.get("train_extra"))
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
                       validate=lambda net: {**denoising_loss(net, scheduler, val_lat),
                                             **(condition_alignment(net, scheduler, align) if align["groups"] else {})},
                       meta=meta,
                       optimizer_state_dtype=section.get("optimizer_state_dtype"), autocast=section.get("autocast"),
                       **ctx["save"])


def _train_decoder(ctx: dict, section: Mapping[str, Any], deadline: float) -> dict:
    """Fine-tune the decoding path on ``(E(x) posterior mean, x)`` pairs of the training images (L1), encoder frozen."""
    import copy

    from monai.engines.utils import default_prepare_batch

    plan = _plan(section)
    base = campaign_autoencoder(ctx["dir"], decoder=False)
    samples = _train_samples(ctx, section.get("train_extra"), section.get("train_extra_images"))
    z = encode_latents(base, samples, device=ctx["save"]["device"])
    train = [{"image": zi, "label": s["image"]} for zi, s in zip(z, samples)]
    del samples, z
    val = load_samples(ctx["manifest"], "val", ctx["preprocessing"], ctx["attributes"], limit=section.get("val_images", 8))
    val_images = torch.stack([s["image"] for s in val]).float()
    pairs = _val_pairs(ctx["manifest"], ctx["preprocessing"], ctx["encoder"], int(section.get("val_pairs", 8)))

    probe = copy.deepcopy(base)  # the frozen encoder with each checkpoint's decoder loaded over it

    def validate(net: torch.nn.Module) -> dict:
        return autoencoder_metrics(_with_decoder(probe, net.state_dict()), val_images, pairs)

    g = torch.Generator().manual_seed(ctx["seed"])
    ae_it = _autoencoder_iteration(ctx["dir"])
    return train_stage("decoder", Decoding(copy.deepcopy(base)).train(), RandomBatches(train, plan.batch_size, g),
                       torch.nn.L1Loss(), default_prepare_batch, SimpleInferer(), plan, ctx["dir"] / "decoder.state.pt",
                       ctx["log"], RngState({"batches": g}), deadline, validate=validate,
                       meta={"autoencoder_iteration": ae_it, "train_samples": len(train)}, **ctx["save"])


def run_campaign(
    bundle_root: str,
    manifest: str,
    preprocessing: Mapping[str, Any],
    attributes: Sequence[Mapping[str, Any]],
    autoencoder: Mapping[str, Any],
    diffusion: Mapping[str, Any],
    stage: str = "all",
    decoder: Mapping[str, Any] | None = None,
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

    ``stage="all"`` trains the autoencoder to its plan's end, then the diffusion model, then (given a ``decoder``
    section) the decoder; a stage that is complete is skipped. Returns ``{stage: {"iteration", "complete", "seconds"}}``.
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
        if stage == "all" and not done["diffusion"]["complete"]:
            return done
    if stage in ("decoder", "all") and decoder:
        done["decoder"] = {k: v for k, v in _train_decoder(ctx, decoder, deadline).items() if k != "meta"}
    elif stage == "decoder":
        raise ValueError("stage 'decoder' needs the campaign config's decoder section")
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
    dec_state = read_state(Path(campaign_dir) / "decoder.state.pt")
    record = {k: {"iterations": int(s["trainer"]["iteration"]), "seconds": round(float(s["seconds"]), 1), "plan": s["plan"]}
              for k, s in (("autoencoder", ae_state), ("diffusion", d_state), ("decoder", dec_state)) if s is not None}
    model = ConditionalLDM(ae_state["meta"]["config"], m["unet"], list(attributes), scale_factor=m["scale_factor"],
                           scheduler=m["scheduler"], drift=m["drift"], drift_target=m["drift_target"],
                           meta={"preprocessing": dict(preprocessing), "defaults": EditSettings.given(defaults), "campaign": record})
    model.autoencoder.load_state_dict(campaign_autoencoder(campaign_dir).state_dict())
    model.unet.load_state_dict(d_state.get("ema") or d_state["network"])
    return model.save(output)
