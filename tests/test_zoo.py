"""LD fine-tuning of a network defined by a model-zoo bundle's config (a bundle folder written here, tiny, random)."""

import json

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from monai_ld import LatentDriftInferer
from monai_ld.engines.zoo import finetune_zoo
from monai_ld.networks import build_scheduler, scheduler_config
from monai_ld.networks.zoo import ZooDenoiser, load_zoo_bundle

AE = {"_target_": "monai.networks.nets.AutoencoderKL", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
      "latent_channels": 3, "channels": [8, 8], "num_res_blocks": 1, "norm_num_groups": 4, "norm_eps": 1e-06,
      "attention_levels": [False, False], "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}
# the brain LDM bundle's diffusion_def at a reduced size: 3 latent + 4 condition input channels, cross-attention on 4
UNET = {"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 3, "in_channels": 7, "out_channels": 3,
        "channels": [8, 16], "num_res_blocks": 1, "attention_levels": [False, True], "norm_num_groups": 4,
        "norm_eps": 1e-06, "resblock_updown": True, "num_head_channels": [0, 8], "with_conditioning": True,
        "transformer_num_layers": 1, "cross_attention_dim": 4, "upcast_attention": True, "use_flash_attention": False}


@pytest.fixture
def bundle_dir(tmp_path):
    """A bundle folder laid out as brain_image_synthesis_latent_diffusion_model's (keys, paths, load functions)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "models").mkdir()
    cfg = {"imports": ["$import torch"], "bundle_root": ".", "load_old": 0, "model_dir": "$@bundle_root + '/models'",
           "autoencoder_def": AE, "network_def": "@autoencoder_def",
           "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'",
           "load_autoencoder": "$@autoencoder_def.load_state_dict(torch.load(@load_autoencoder_path))",
           "diffusion_def": UNET, "load_diffusion_path": "$@model_dir + '/model.pt'",
           "load_diffusion": "$@diffusion_def.load_state_dict(torch.load(@load_diffusion_path))",
           "scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler", "beta_start": 0.0015, "beta_end": 0.0205,
                         "num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "clip_sample": False}}
    (tmp_path / "configs" / "inference.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    ae = AutoencoderKL(**{k: v for k, v in AE.items() if k != "_target_"})
    unet = DiffusionModelUNet(**{k: v for k, v in UNET.items() if k != "_target_"})
    with torch.no_grad():  # MONAI zero-initialises output convs (UNet, attention proj_out): as if pretrained
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    torch.save(ae.state_dict(), tmp_path / "models" / "autoencoder.pt")
    torch.save(unet.state_dict(), tmp_path / "models" / "model.pt")
    return tmp_path


def _data(bundle, n=6):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 8, 8, 8, generator=g)
    with torch.no_grad():
        z = bundle.autoencoder.encode(x)[0] * bundle.scale_factor
    # the brain LDM's condition: [gender, age, ventricular_vol, brain_vol] in [0, 1], shape (N, 1, 4)
    return z, torch.rand(n, 1, 4, generator=g)


def test_load_zoo_bundle_builds_the_configured_networks_with_their_weights(bundle_dir):
    b = load_zoo_bundle(bundle_dir)
    assert b.unet_key == "diffusion_def" and isinstance(b.unet, DiffusionModelUNet) and isinstance(b.autoencoder, AutoencoderKL)
    saved = torch.load(bundle_dir / "models" / "model.pt")
    assert all(torch.equal(v, saved[k]) for k, v in b.unet.state_dict().items())
    with pytest.raises(ValueError, match="same network"):
        load_zoo_bundle(bundle_dir, unet_key="network_def")
    with pytest.raises(FileNotFoundError):
        load_zoo_bundle(bundle_dir, unet_weights=bundle_dir / "models" / "missing.pt")


@pytest.mark.parametrize("scheme", ["lora", "embedding", "full"])
def test_ld_finetune_of_a_zoo_network_writes_weights_the_bundle_loads(bundle_dir, scheme):
    b = load_zoo_bundle(bundle_dir)
    base = {k: v.clone() for k, v in b.unet.state_dict().items()}
    z, c = _data(b)
    out = finetune_zoo(b, z, build_scheduler(scheduler_config()), bundle_dir / "models" / f"ld_{scheme}.pt", conditions=c,
                       scheme=scheme, lora_rank=2, concat=True, drift=0.1, max_iterations=3, batch_size=3, lr=1e-2)
    tuned = torch.load(out, weights_only=True)
    assert set(tuned) == set(base)  # plain weights, adapters merged
    changed = [k for k in base if not torch.equal(tuned[k], base[k])]
    if scheme == "lora":
        assert changed and all(".to_" in k or "out_proj" in k for k in changed), changed
    elif scheme == "embedding":
        assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed), changed
    else:
        assert len(changed) > len(base) // 2
    assert b.meta["finetune"]["drift"] == 0.1 and b.meta["finetune"]["scheme"] == scheme
    # the bundle's own config loads the fine-tuned file unchanged
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser["bundle_root"], parser["load_diffusion_path"] = str(bundle_dir), str(out)
    parser.get_parsed_content("load_diffusion")
    net = parser.get_parsed_content("diffusion_def")
    assert all(torch.equal(v, tuned[k]) for k, v in net.state_dict().items())


def test_zoo_network_samples_and_edits_with_ld(bundle_dir):
    b = load_zoo_bundle(bundle_dir)
    den = ZooDenoiser(b.unet.eval(), cross_attention=True, concat=True)
    z, c = _data(b, 2)
    inf = LatentDriftInferer(build_scheduler(scheduler_config(num_inference_steps=5)), scale_factor=b.scale_factor, drift=0.05)
    img = inf.sample(torch.randn(1, 3, 4, 4, 4), b.autoencoder, den, conditioning=c[:1], verbose=False, cfg=2.0)
    assert img.shape == (1, 1, 8, 8, 8)
    x = torch.rand(1, 1, 8, 8, 8)
    out = inf.counterfactual(x, b.autoencoder, den, c[:1], c[1:], strength=0.6, guidance_scale=2.0)
    assert out.image.shape == x.shape and not torch.equal(out.latents["counterfactual"], out.latents["source"])
    with pytest.raises(ValueError, match="context is required"):
        den(z, torch.tensor([1.0]))


def test_maisi_layout_rflow_lora_finetune(tmp_path):
    """MAISI's layout: ``diffusion_unet_def`` (DiffusionModelUNetMaisi, spacing + modality inputs, no cross-attention),
    weights under ``unet_state_dict`` with ``scale_factor``, rectified flow, L1 on the velocity."""
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    net_def = {"_target_": "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
               "spatial_dims": 3, "in_channels": 4, "out_channels": 4, "num_channels": [8, 16],
               "attention_levels": [False, True], "num_head_channels": [0, 8], "num_res_blocks": 1, "norm_num_groups": 4,
               "use_flash_attention": False, "include_top_region_index_input": False,
               "include_bottom_region_index_input": False, "include_spacing_input": True, "num_class_embeds": 4,
               "resblock_updown": True, "include_fc": True}
    (tmp_path / "configs").mkdir()
    (tmp_path / "models").mkdir()
    cfg = {"bundle_root": ".", "model_dir": "$@bundle_root + '/models'", "diffusion_unet_def": net_def,
           "trained_diffusion_path": "$@model_dir + '/diff_unet_3d_rflow.pt'"}
    (tmp_path / "configs" / "inference.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    unet = DiffusionModelUNetMaisi(**{k: v for k, v in net_def.items() if k != "_target_"})
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(0.8)}, tmp_path / "models" / "diff_unet_3d_rflow.pt")
    b = load_zoo_bundle(tmp_path, autoencoder_key=None)
    assert b.unet_key == "diffusion_unet_def" and b.scale_factor == pytest.approx(0.8) and b.autoencoder is None
    static = {"spacing_tensor": torch.tensor([[150.0, 150.0, 200.0]]), "class_labels": torch.tensor([1])}
    z = torch.randn(4, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    rflow = build_scheduler(scheduler_config("RFlow", num_inference_steps=4))
    out = finetune_zoo(b, z, rflow, tmp_path / "models" / "ld.pt", scheme="lora", lora_rank=2, cross_attention=False,
                       static_inputs=static, drift=-0.1, loss="l1", max_iterations=3, batch_size=2, lr=1e-2)
    ckpt = torch.load(out, weights_only=True)
    assert set(ckpt) == {"unet_state_dict", "scale_factor"} and float(ckpt["scale_factor"]) == pytest.approx(0.8)
    base = torch.load(tmp_path / "models" / "diff_unet_3d_rflow.pt", weights_only=True)["unet_state_dict"]
    assert any(not torch.equal(v, base[k]) for k, v in ckpt["unet_state_dict"].items())
    den = ZooDenoiser(b.unet, cross_attention=False, static_inputs=static)
    lat = LatentDriftInferer(rflow, drift=-0.1).sample(torch.randn(2, 4, 4, 4, 4), IdentityAE(), den, verbose=False)
    assert lat.shape == (2, 4, 4, 4, 4) and torch.isfinite(lat).all()


class IdentityAE(torch.nn.Module):
    def decode_stage_2_outputs(self, z):
        return z
