"""Tutorial 02: Latent Drifting in a diffusers pipeline, and an LD LoRA fine-tune of a model-zoo-format network.

Run (offline; tiny randomly initialised networks, nothing is downloaded; about a minute on 2 idle CPU cores)::

    python tutorials/02_diffusers_ld.py [OUTPUT_DIR]      # default: a temporary folder

1. diffusers: a stock ``DDIMPipeline`` gets LD by swapping its scheduler, ``pipe.scheduler =
   DriftedScheduler(pipe.scheduler, δ)``; δ = 0 reproduces the stock images bit for bit, δ ≠ 0 shifts them.
2. diffusers: an LD counterfactual of a "real" image over diffusers components (``AutoencoderKL`` +
   ``UNet2DConditionModel`` + ``FlowMatchEulerDiscreteScheduler``): flow inversion under the source condition,
   re-generation under the target with guidance and drift.
3. model zoo: a bundle folder laid out like MONAI's ``brain_image_synthesis_latent_diffusion_model`` (reduced size,
   random weights) is loaded from its own ``configs/inference.json``, LoRA-fine-tuned with LD forward drift, written
   back in the bundle's weight format (the bundle's config loads it), and sampled / edited with LD.
With real weights, point ``load_zoo_bundle`` at the unpacked bundle instead (docs/model_zoo.md).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (AutoencoderKL, DDIMPipeline, DDIMScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       UNet2DConditionModel, UNet2DModel)
from monai.bundle import ConfigParser  # noqa: E402

from monai_ld import LatentDriftInferer  # noqa: E402
from monai_ld.diffusers import DriftedScheduler, ld_counterfactual  # noqa: E402
from monai_ld.engines.zoo import finetune_zoo  # noqa: E402
from monai_ld.networks import build_scheduler, scheduler_config  # noqa: E402
from monai_ld.networks.zoo import ZooDenoiser, load_zoo_bundle  # noqa: E402


def diffusers_pipeline() -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,  # noqa: E731
                       output_type="np").images
    stock = run()
    original = pipe.scheduler
    for delta in (0.0, -0.02, 0.02):
        pipe.scheduler = DriftedScheduler(original, delta)  # the only change to the pipeline
        images = run()
        print(f"[1] DDIMPipeline with LD δ={delta:+.2f}: mean {images.mean():.4f} (stock {stock.mean():.4f}), "
              f"bit-identical to stock: {bool((images == stock).all())}")
    pipe.scheduler = original


def diffusers_counterfactual() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval()
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=8, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    source, target = torch.zeros(1, 1, 8), torch.ones(1, 1, 8)  # e.g. attribute contexts (or text embeddings)
    for delta in (0.0, 0.05):
        out = ld_counterfactual(image, vae, unet, FlowMatchEulerDiscreteScheduler(shift=3.0), source, target,
                                strength=0.6, num_inference_steps=10, guidance_scale=3.0, drift=delta,
                                generator=torch.Generator().manual_seed(0))
        edit = (out.image - out.reconstruction).abs().mean()
        print(f"[2] flow-matching counterfactual δ={delta:.2f}: {out.settings['steps']} steps, mean |edit| {edit:.4f}")


def write_zoo_bundle(root: Path) -> None:
    """The brain LDM bundle's layout and key names (autoencoder_def, diffusion_def, load_*_path), reduced in size."""
    ae = {"_target_": "monai.networks.nets.AutoencoderKL", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
          "latent_channels": 3, "channels": [8, 8], "num_res_blocks": 1, "norm_num_groups": 4,
          "attention_levels": [False, False], "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}
    unet = {"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 3, "in_channels": 7, "out_channels": 3,
            "channels": [8, 16], "num_res_blocks": 1, "attention_levels": [False, True], "norm_num_groups": 4,
            "resblock_updown": True, "num_head_channels": [0, 8], "with_conditioning": True, "cross_attention_dim": 4,
            "upcast_attention": True}
    cfg = {"imports": ["$import torch"], "bundle_root": ".", "load_old": 0, "model_dir": "$@bundle_root + '/models'",
           "autoencoder_def": ae, "network_def": "@autoencoder_def", "diffusion_def": unet,
           "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'", "load_diffusion_path": "$@model_dir + '/model.pt'",
           "load_diffusion": "$@diffusion_def.load_state_dict(torch.load(@load_diffusion_path))"}
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    parser = ConfigParser(cfg)
    torch.manual_seed(0)
    a, u = parser.get_parsed_content("autoencoder_def"), parser.get_parsed_content("diffusion_def")
    with torch.no_grad():  # stand-in for pretrained weights: MONAI zero-initialises its output projections
        for p in u.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    torch.save(a.state_dict(), root / "models" / "autoencoder.pt")
    torch.save(u.state_dict(), root / "models" / "model.pt")


def zoo_lora_finetune(root: Path) -> None:
    write_zoo_bundle(root)
    bundle = load_zoo_bundle(root)  # networks from configs/inference.json, weights from models/
    print(f"[3] loaded {bundle.unet_key} ({sum(p.numel() for p in bundle.unet.parameters())} parameters) from {root}")
    g = torch.Generator().manual_seed(2)
    images = torch.rand(8, 1, 8, 8, 8, generator=g)  # the site's images, resampled to the bundle's grid
    with torch.no_grad():
        latents = bundle.autoencoder.encode(images)[0] * bundle.scale_factor
    # the brain LDM's condition [gender, age, ventricular_vol, brain_vol] in [0, 1], (N, 1, 4); see docs/model_zoo.md
    conditions = torch.rand(8, 1, 4, generator=g)
    out = finetune_zoo(bundle, latents, build_scheduler(scheduler_config()), root / "models" / "model_ld_lora.pt",
                       conditions=conditions, scheme="lora", lora_rank=2, concat=True, drift=0.1, max_iterations=10,
                       batch_size=4, lr=1e-3)
    ft = bundle.meta["finetune"]
    print(f"[3] LD LoRA fine-tune δ={ft['drift']}: loss {ft['loss_first']:.4f} -> {ft['loss_last']:.4f}, wrote {out.name}")
    parser = ConfigParser()  # the bundle's own config loads the result unchanged
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"], parser["load_diffusion_path"] = str(root), str(out)
    parser.get_parsed_content("load_diffusion")
    denoiser = ZooDenoiser(bundle.unet.eval(), cross_attention=True, concat=True)
    inferer = LatentDriftInferer(build_scheduler(scheduler_config(num_inference_steps=10)), bundle.scale_factor, drift=0.1)
    sample = inferer.sample(torch.randn(1, 3, 4, 4, 4, generator=g), bundle.autoencoder, denoiser,
                            conditioning=conditions[:1], verbose=False)
    older = conditions[:1].clone()
    older[..., 1] = 0.9  # the age entry
    cf = inferer.counterfactual(images[:1], bundle.autoencoder, denoiser, conditions[:1], older, strength=0.5)
    print(f"[3] LD sample {tuple(sample.shape)}; counterfactual (age -> 0.9) mean |change| {cf.change.abs().mean():.4f}")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="monai_ld_tutorial02_"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    diffusers_pipeline()
    diffusers_counterfactual()
    zoo_lora_finetune(out / "zoo_bundle")
    print(f"done; bundle folder in {out / 'zoo_bundle'}")


if __name__ == "__main__":
    main()
