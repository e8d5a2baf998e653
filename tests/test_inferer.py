"""Inversion, counterfactuals and the one-file checkpoint."""

import os

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from monai_ld import ConditionalLDM, LatentDriftInferer
from monai_ld.inferers import ddim_inversion_step, make_inferer, mask_to_image, strength_timesteps
from monai_ld.networks import autoencoder_config, scheduler_config, unet_config


def ddim(steps=50):
    s = DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205, clip_sample=False)
    s.set_timesteps(steps)
    return s


def test_inversion_step_mirrors_ddim_step():
    """With a constant ε̂, step(invert(x)) == x exactly (the inverse uses the very alphas step uses)."""
    s = ddim(50)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    for t in (int(s.timesteps[0]), int(s.timesteps[25]), int(s.timesteps[-1])):
        up = ddim_inversion_step(s, eps, t, x)
        back, _ = s.step(eps, t, up)
        assert torch.allclose(back, x, atol=1e-5)


class GaussianDenoiser(torch.nn.Module):
    """The exact MMSE ε̂ for data z_0 ~ N(mu, sigma²): ε̂ = sqrt(1-ᾱ)(x - sqrt(ᾱ)mu) / (ᾱσ² + 1 - ᾱ).
    Under it the DDIM ODE is exact, so inversion + denoising is off only by discretisation."""

    def __init__(self, alphas_cumprod, mu, sigma):
        super().__init__()
        self.ac, self.mu, self.sigma = alphas_cumprod, mu, sigma

    def forward(self, x, timesteps, context=None):
        a = self.ac[timesteps.long()].reshape(-1, *[1] * (x.ndim - 1))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.sigma**2 + 1 - a)


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_inversion_then_denoising_returns_start_under_exact_denoiser(strength):
    s = ddim(50)
    model = GaussianDenoiser(s.alphas_cumprod, 0.3, 1.0)
    z0 = 0.3 + torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inferer = LatentDriftInferer(s)
    inv = inferer.invert(model, latents=z0, strength=strength)
    if strength == 1.0:  # all the way to (nearly) standard normal noise
        assert abs(inv.latent.std().item() - 1.0) < 0.05
    back = inferer.denoise(inv.latent, model, inv.timesteps, None, drift=0.0)
    assert ((back - z0).abs().mean() / z0.abs().mean()) < 0.03


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_inversion_then_denoising_on_unet(spatial_dims):
    """A real conditional UNet (2D/3D) with a low-gain output layer: the round trip closes to <1%."""
    from conftest import randomise_output
    from monai_ld import AttributeEncoder, ContinuousAttribute
    from monai_ld.networks import build_unet

    enc = AttributeEncoder([ContinuousAttribute("age", 40, 95)])
    torch.manual_seed(0)
    unet = randomise_output(build_unet(unet_config(spatial_dims, 3, enc.dim, "tiny")), 0, std=0.002).eval()
    inferer = LatentDriftInferer(ddim(50))
    z0 = torch.randn((1, 3) + (8,) * spatial_dims, generator=torch.Generator().manual_seed(0)) * 0.5
    cond = enc.context({"age": 70})
    inv = inferer.invert(unet, latents=z0, conditioning=cond, strength=0.6)
    assert len(inv.timesteps) == 30 and (inv.latent - z0).abs().mean() > 0.1
    back = inferer.denoise(inv.latent, unet, inv.timesteps, cond, drift=0.0)
    assert ((back - z0).abs().mean() / z0.abs().mean()) < 0.01


def test_strength_timesteps_and_bad_strength():
    s = ddim(10)
    assert len(strength_timesteps(s, 0.0)) == 0 and len(strength_timesteps(s, 1.0)) == 10
    assert torch.equal(strength_timesteps(s, 0.3), s.timesteps[-3:])
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        strength_timesteps(s, 1.5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counterfactual_shape_dtype_and_change(tiny_models, spatial_dims, dtype):
    ae, unet, enc = tiny_models(spatial_dims)
    inferer = LatentDriftInferer(ddim(10), scale_factor=1.0)
    x = torch.rand((2, 1) + (16,) * spatial_dims, generator=torch.Generator().manual_seed(1)).to(dtype)
    src = enc.context([{"age": 50, "sex": "F"}, {"age": 60, "sex": "M"}])
    tgt = enc.context([{"age": 90, "sex": "F"}, {"age": 95, "sex": "M"}])
    out = inferer.counterfactual(x, ae, unet, src, tgt, strength=0.5, guidance_scale=3.0, drift=0.05)
    assert out.image.shape == x.shape and out.image.dtype == dtype
    assert out.difference.shape == x.shape
    assert torch.allclose(out.difference, out.image - x, atol=1e-5)
    assert not torch.allclose(out.image, out.reconstruction)
    assert out.settings["steps"] == 5 and out.settings["drift"] == 0.05 and out.settings["source"] == "given"
    # null-source abduction runs and says so
    out_null = inferer.counterfactual(x, ae, unet, None, tgt, strength=0.5)
    assert out_null.settings["source"] == "null"


def test_counterfactual_strength_zero_is_reconstruction_and_residual_keeps_input(tiny_models):
    ae, unet, enc = tiny_models(2)
    inferer = LatentDriftInferer(ddim(10))
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    tgt = enc.context({"age": 90, "sex": "M"})
    out = inferer.counterfactual(x, ae, unet, tgt, tgt, strength=0.0)
    assert torch.allclose(out.image, out.reconstruction)
    res = inferer.counterfactual(x, ae, unet, tgt, tgt, strength=0.0, composition="residual")
    assert torch.allclose(res.image, x, atol=1e-6)


def _edit_case(tiny_models, spatial_dims):
    """Tiny networks, a 10-step DDIM inferer, a random image and a (source, target) pair of conditions."""
    ae, unet, enc = tiny_models(spatial_dims)
    x = torch.rand((1, 1) + (16,) * spatial_dims, generator=torch.Generator().manual_seed(5))
    return ae, unet, LatentDriftInferer(ddim(10)), x, enc.context({"age": 50, "sex": "F"}), enc.context({"age": 90, "sex": "M"})


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_paired_composition_isolates_the_change_of_condition(tiny_models, spatial_dims):
    ae, unet, inferer, x, src, tgt = _edit_case(tiny_models, spatial_dims)
    kw = dict(strength=0.6, guidance_scale=3.0, drift=0.05)
    # an identity intervention changes nothing at all, even with guidance and drift (residual does not: guidance
    # and the inversion error move the regenerated latent)
    same = inferer.counterfactual(x, ae, unet, src, src, composition="paired", **kw)
    assert torch.equal(same.change, torch.zeros_like(x)) and torch.allclose(same.image, x, atol=1e-7)
    res = inferer.counterfactual(x, ae, unet, src, src, composition="residual", **kw)
    assert (res.image - x).abs().mean() > 1e-4
    # a real intervention: change = D(z'_0) - D(z^s_0) = image - x; the target half equals composition "none"
    out = inferer.counterfactual(x, ae, unet, src, tgt, composition="paired", **kw)
    none = inferer.counterfactual(x, ae, unet, src, tgt, composition="none", **kw)
    assert (out.change.abs().mean() > 1e-4) and torch.allclose(out.change, out.image - x, atol=1e-6)
    assert torch.allclose(none.change, none.image - none.reconstruction, atol=1e-6)
    assert out.settings["composition"] == "paired"


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masked_edit_follows_the_source_trajectory_outside_the_mask(tiny_models, spatial_dims):
    ae, unet, inferer, x, src, tgt = _edit_case(tiny_models, spatial_dims)
    kw = dict(strength=0.6, guidance_scale=3.0, drift=0.05, composition="paired", generator=torch.Generator().manual_seed(1))
    free = inferer.counterfactual(x, ae, unet, src, tgt, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    out = inferer.counterfactual(x, ae, unet, src, tgt, mask_threshold=0.5, **kw)
    mask = out.latents["mask"]
    assert mask.shape == (1, 1) + out.latents["counterfactual"].shape[2:] and set(mask.unique().tolist()) == {0.0, 1.0}
    assert 0 < mask.mean() < 1 and out.settings["mask_threshold"] == 0.5
    # outside the mask the latent is exactly the source run's (the unmasked paired baseline z^s_0); inside it moves
    kw["generator"] = torch.Generator().manual_seed(1)
    timesteps = strength_timesteps(inferer.scheduler, 0.6)
    z_src = inferer.denoise(out.latents["inverted"], unet, timesteps, src, cfg=3.0, drift=0.05)
    outside, inside = mask.expand_as(z_src) == 0, mask.expand_as(z_src) == 1
    assert torch.equal(out.latents["counterfactual"][outside], z_src[outside])
    assert (out.latents["counterfactual"][inside] - z_src[inside]).abs().mean() > 1e-4
    assert torch.allclose(out.change, out.image - x, atol=1e-6)
    # in image space the input is kept exactly outside the (dilated, upsampled) region
    region = mask_to_image(mask, x.shape[2:])
    assert torch.equal(out.image[region == 0], x[region == 0]) and (region == 0).any()
    # a smaller region changes the image less than the free edit
    assert out.change.abs().mean() < free.change.abs().mean()
    # an identity intervention: the mask is empty and the image is the input
    same = inferer.counterfactual(x, ae, unet, src, src, mask_threshold=0.5, **kw)
    assert same.latents["mask"].sum() == 0 and torch.allclose(same.image, x, atol=1e-7)
    with pytest.raises(ValueError, match=r"mask threshold must be in \(0, 1\)"):
        inferer.counterfactual(x, ae, unet, src, tgt, mask_threshold=1.0, **kw)


def test_paired_composition_replays_stochastic_step_noise(tiny_models):
    ae, unet, enc = tiny_models(2)
    s = DDPMScheduler(num_train_timesteps=100)
    s.set_timesteps(10)
    inferer = LatentDriftInferer(s)
    x = torch.rand(1, 1, 16, 16)
    src = enc.context({"age": 70, "sex": "F"})
    out = inferer.counterfactual(x, ae, unet, src, src, abduction="noising", composition="paired",
                                 generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.image, x, atol=1e-7)


def test_counterfactual_noising_abduction_is_seeded(tiny_models):
    """Every draw (the noising, DDPM's step noise) comes from the generator: the same seed gives the same image
    whatever torch's global RNG holds, and the global RNG is neither read nor changed by a seeded edit."""
    ae, unet, enc = tiny_models(2)
    s = DDPMScheduler(num_train_timesteps=100)
    s.set_timesteps(10)
    inferer = LatentDriftInferer(s)
    x = torch.rand(1, 1, 16, 16)
    tgt = enc.context({"age": 90, "sex": "M"})
    with pytest.raises(ValueError, match="DDIM inversion needs a DDIMScheduler"):
        inferer.counterfactual(x, ae, unet, None, tgt)
    torch.manual_seed(0)
    a = inferer.counterfactual(x, ae, unet, None, tgt, abduction="noising", generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    b = inferer.counterfactual(x, ae, unet, None, tgt, abduction="noising", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.image, b.image) and torch.equal(torch.get_rng_state(), state)
    c = inferer.counterfactual(x, ae, unet, None, tgt, abduction="noising", generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a.image, c.image)


def test_per_item_generators_equal_single_runs(tiny_models):
    """A batch with one generator per item (noising, mask and DDPM step noise) equals each item run alone."""
    ae, unet, enc = tiny_models(2)
    s = DDPMScheduler(num_train_timesteps=100)
    s.set_timesteps(10)
    inferer = LatentDriftInferer(s, drift=0.05)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    src, tgt = enc.context([{"age": 50, "sex": "F"}] * 2), enc.context([{"age": 90, "sex": "M"}] * 2)
    kw = dict(abduction="noising", composition="paired", mask_threshold=0.5, strength=0.6)
    both = inferer.counterfactual(x, ae, unet, src, tgt, generator=[torch.Generator().manual_seed(i) for i in (3, 4)], **kw)
    for i, seed in enumerate((3, 4)):
        one = inferer.counterfactual(x[i : i + 1], ae, unet, src[:1], tgt[:1], generator=torch.Generator().manual_seed(seed), **kw)
        torch.testing.assert_close(both.image[i : i + 1], one.image)


def test_counterfactual_bad_inputs(tiny_models):
    ae, unet, enc = tiny_models(2)
    inferer = LatentDriftInferer(ddim(10))
    tgt = enc.context({"age": 90, "sex": "M"})
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        inferer.counterfactual(torch.rand(16, 16), ae, unet, None, tgt)
    with pytest.raises(ValueError, match="batch"):
        inferer.counterfactual(torch.rand(2, 1, 16, 16), ae, unet, None, tgt)
    with pytest.raises(ValueError, match="multiple of"):
        inferer.counterfactual(torch.rand(1, 1, 14, 14), ae, unet, None, tgt)


def test_checkpoint_roundtrip_weights_only_and_atomic(tmp_path, tiny_models):
    _, _, enc = tiny_models(3)
    model = ConditionalLDM(autoencoder_config(3, "tiny"), unet_config(3, 3, enc.dim, "tiny"), enc, scale_factor=0.8,
                           scheduler=scheduler_config(num_inference_steps=20), drift=0.1, drift_target="unshifted",
                           meta={"spatial_size": [16, 16, 16]})
    path = model.save(tmp_path / "sub" / "model.pt")
    assert sorted(os.listdir(path.parent)) == ["model.pt"]  # no temp file left behind
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "monai_ld.ldm/1" and ckpt["drift"]["target"] == "unshifted"
    again = ConditionalLDM.load(path)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert again.encoder.names == ("age", "sex") and again.scale_factor == 0.8 and again.meta["spatial_size"] == [16, 16, 16]
    inferer = make_inferer(again)
    assert inferer.drift == 0.1 and len(inferer.scheduler.timesteps) == 20 and again.drift_target == "unshifted"


def test_checkpoint_errors(tmp_path, tiny_models):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ConditionalLDM.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        ConditionalLDM.load(bad)
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a monai_ld checkpoint"):
        ConditionalLDM.load(tmp_path / "other.pt")
    _, _, enc = tiny_models(2)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        ConditionalLDM(autoencoder_config(2, "tiny"), unet_config(2, 3, enc.dim + 1, "tiny"), enc)
