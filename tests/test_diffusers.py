"""Latent Drifting over diffusers (tiny randomly initialised models built from config; nothing downloaded)."""

import inspect
import os
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,
                       FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler, UNet2DConditionModel, UNet2DModel)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from monai_ld.diffusers import DriftedScheduler, forward_drift, ld_counterfactual


def tiny_unet2d(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def tiny_cond_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    with torch.no_grad():  # outputs on the scale of the latents (a default init predicts ~6x their size)
        unet.conv_out.weight.mul_(0.1), unet.conv_out.bias.mul_(0.1)
    return unet


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


@pytest.mark.parametrize("pipeline_cls, scheduler_cls", [(DDPMPipeline, DDPMScheduler), (DDIMPipeline, DDIMScheduler)])
def test_pipeline_drop_in_zero_drift_bit_identical_and_drift_equals_hand_loop(pipeline_cls, scheduler_cls):
    unet, steps, delta = tiny_unet2d(), 6, 0.05
    pipe = pipeline_cls(unet=unet, scheduler=scheduler_cls(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="np").images
    stock = run()
    pipe.scheduler = DriftedScheduler(pipe.scheduler, 0.0)
    assert (run() == stock).all()  # δ = 0: bit-identical to the stock pipeline (DDPM: same step noise too)
    pipe.scheduler = DriftedScheduler(pipe.scheduler.scheduler, delta)
    drifted = run()
    # the same sampler by hand: stock scheduler step, then + δ (images leave the pipeline as (z/2+0.5) clipped)
    g, sched = torch.Generator().manual_seed(0), scheduler_cls(num_train_timesteps=100)
    sched.set_timesteps(steps)
    z = randn_tensor((2, 3, 8, 8), generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(unet(z, t).sample, t, z, generator=g).prev_sample + delta
    hand = (z / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(drifted - hand).max() < 1e-6 and abs(drifted - stock).max() > 1e-3


def test_flow_matching_zero_drift_bit_identical_and_drift_equals_euler_hand_loop():
    unet, cond, delta = tiny_cond_unet(), torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1)), -0.04
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def sample(sched):
        sched.set_timesteps(5)
        z = noise
        with torch.no_grad():
            for t in sched.timesteps:
                z = sched.step(unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
        return z

    make = lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    stock = sample(make())
    assert torch.equal(sample(DriftedScheduler(make(), 0.0)), stock)
    drifted = sample(DriftedScheduler(make(), delta))
    ref = make()
    ref.set_timesteps(5)
    z = noise
    with torch.no_grad():  # Euler on σ: z ← z + (σ_{i+1} - σ_i)·v̂ + δ
        for i, t in enumerate(ref.timesteps):
            z = z + (ref.sigmas[i + 1] - ref.sigmas[i]) * unet(z, t, encoder_hidden_states=cond).sample + delta
    assert torch.allclose(drifted, z, atol=1e-6) and not torch.allclose(drifted, stock, atol=1e-3)


def test_wrapper_keeps_the_scheduler_api():
    base = DDIMScheduler(num_train_timesteps=100)
    d = DriftedScheduler(base, 0.1)
    params = inspect.signature(d.step).parameters  # what prepare_extra_step_kwargs inspects
    assert "eta" in params and "generator" in params and "return_dict" in params
    # pipelines' retrieve_timesteps inspects set_timesteps' signature for custom `timesteps` / `sigmas`
    assert "timesteps" not in inspect.signature(d.set_timesteps).parameters  # DDIM has none, as the original
    ddpm = DriftedScheduler(DDPMScheduler(num_train_timesteps=100), 0.1)
    assert "timesteps" in inspect.signature(ddpm.set_timesteps).parameters
    ddpm.set_timesteps(timesteps=[90, 60, 30, 0])
    assert ddpm.scheduler.timesteps.tolist() == [90, 60, 30, 0] and ddpm.custom_timesteps
    d.set_timesteps(4)
    ts = d.timesteps
    assert len(ts) == 4 and torch.equal(ts, base.timesteps) and d.config is base.config and d.order == 1
    assert d.init_noise_sigma == base.init_noise_sigma and len(d) == len(base)
    x = torch.zeros(1, 3, 4, 4)
    assert torch.equal(d.scale_model_input(x, ts[0]), x)
    out = d.step(torch.zeros_like(x), ts[0], x)
    assert isinstance(out, DDIMSchedulerOutput) and out.pred_original_sample is not None
    ref = base.step(torch.zeros_like(x), ts[0], x)
    assert torch.allclose(out.prev_sample, ref.prev_sample + 0.1)
    tup = d.step(torch.zeros_like(x), ts[0], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2 and torch.allclose(tup[0], ref.prev_sample + 0.1)
    per_sample = DriftedScheduler(DDIMScheduler(num_train_timesteps=100), torch.tensor([0.1, -0.1]))
    per_sample.set_timesteps(4)
    two = per_sample.step(torch.zeros(2, 3, 4, 4), per_sample.timesteps[0], torch.zeros(2, 3, 4, 4)).prev_sample
    assert torch.allclose(two[:, 0, 0, 0], torch.tensor([0.1, -0.1]))
    d.custom_state = 3  # attribute writes reach the wrapped scheduler
    assert base.custom_state == 3
    with pytest.raises(ValueError, match="order-2"):
        DriftedScheduler(HeunDiscreteScheduler(), 0.1)
    with pytest.raises(ValueError, match="already drifted"):
        DriftedScheduler(d, 0.1)


@pytest.mark.parametrize("target", ["shifted", "unshifted"])
def test_forward_drift_training_pairs(target):
    z0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t, d = torch.tensor([10, 80]), 0.1
    shift = d if target == "shifted" else 0.0
    ddpm = DDPMScheduler(num_train_timesteps=100)
    noisy, tgt = forward_drift(ddpm, z0, eps, t, d, target)
    assert torch.equal(noisy, ddpm.add_noise(z0, eps + d, t)) and torch.allclose(tgt, eps + shift)
    v = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    assert torch.allclose(forward_drift(v, z0, eps, t, d, target)[1], v.get_velocity(z0, eps + shift, t))
    assert torch.equal(forward_drift(ddpm, z0, eps, t, 0.0)[0], ddpm.add_noise(z0, eps, t))  # δ = 0: stock
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=100)
    ft = flow.timesteps[torch.tensor([5, 60])]
    noisy, tgt = forward_drift(flow, z0, eps, ft, d, target)
    s = flow.sigmas[torch.tensor([5, 60])].reshape(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - s) * z0 + s * (eps + d), atol=1e-6) and torch.allclose(tgt, eps + shift - z0)
    by_sigma, _ = forward_drift(flow, z0, eps, ft, d, target, sigmas=s.flatten())
    assert torch.allclose(by_sigma, noisy, atol=1e-6)


class StateFreeDenoiser(torch.nn.Module):
    """A prediction that depends on t and the condition but not on z: inversion must then close to float error."""

    def forward(self, z, t, encoder_hidden_states=None):
        g = torch.Generator().manual_seed(int(float(t)))
        return SimpleNamespace(sample=torch.randn(z.shape, generator=g) * 0.5 + encoder_hidden_states.mean())


def _cf(scheduler, unet, cond_a, cond_b, **kw):
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return ld_counterfactual(x, tiny_vae(), unet, scheduler, cond_a, cond_b, **kw)


SRC = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(3))
TGT = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(4))
SCHEDULERS = {"ddim": lambda: DDIMScheduler(num_train_timesteps=1000, clip_sample=False),
              "flow": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)}


@pytest.mark.parametrize("name", ["ddim", "flow"])
def test_counterfactual_inversion_is_the_exact_mirror_of_sampling(name):
    r = _cf(SCHEDULERS[name](), StateFreeDenoiser(), SRC, SRC, strength=0.6, num_inference_steps=30, guidance_scale=None)
    z0 = r.latents["source"]
    assert r.settings["steps"] == 18 and float((r.latents["inverted"] - z0).abs().mean()) > 0.1
    assert float((r.latents["counterfactual"] - z0).abs().max()) < 1e-5


def test_flow_matching_inversion_round_trip_on_a_unet():
    """On a real (random) UNet the round trip closes up to the velocity's change between levels: O(1/steps)."""
    err = []
    for steps in (20, 80):
        r = _cf(SCHEDULERS["flow"](), tiny_cond_unet(), SRC, SRC, strength=0.6, num_inference_steps=steps, guidance_scale=None)
        z0 = r.latents["source"]
        err.append(float((r.latents["counterfactual"] - z0).abs().max() / z0.abs().max()))
    assert err[1] < err[0] / 2 and err[1] < 0.02, err


@pytest.mark.parametrize("name", ["ddim", "flow"])
def test_counterfactual_guidance_drift_and_strength_zero(name):
    unet, kw = tiny_cond_unet(), dict(strength=0.5, num_inference_steps=8, guidance_scale=2.0)
    edit = _cf(SCHEDULERS[name](), unet, SRC, TGT, **kw)
    drifted = _cf(SCHEDULERS[name](), unet, SRC, TGT, drift=0.05, **kw)
    assert edit.image.shape == (1, 1, 16, 16) and torch.equal(edit.reconstruction, drifted.reconstruction)
    assert torch.equal(edit.latents["inverted"], drifted.latents["inverted"])  # drift acts on the denoising only
    assert not torch.allclose(edit.latents["counterfactual"], drifted.latents["counterfactual"], atol=1e-3)
    none = _cf(SCHEDULERS[name](), unet, SRC, TGT, strength=0.0, drift=0.05)
    assert torch.equal(none.image, none.reconstruction) and none.settings["steps"] == 0


def test_counterfactual_noising_is_seeded_and_ddpm_refuses_inversion():
    vae, unet = tiny_vae(), tiny_cond_unet()
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    c = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(3))
    run = lambda seed: ld_counterfactual(x, vae, unet, DDPMScheduler(num_train_timesteps=100), c, c, strength=0.5,
                                         num_inference_steps=6, drift=0.1, abduction="noising",
                                         generator=torch.Generator().manual_seed(seed)).image
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    with pytest.raises(ValueError, match="noising"):
        ld_counterfactual(x, vae, unet, DDPMScheduler(num_train_timesteps=100), c, c)
