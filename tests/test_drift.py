"""Pin the Latent Drifting semantics (see ../shared/DESIGN.md, "Latent Drifting, precisely")."""

import math

import pytest
import torch
from monai.inferers import DiffusionInferer, LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from monai_ld import DriftedScheduler, DriftTarget, LatentDriftInferer, forward_drift, with_drift
from monai_ld.engines import LatentDriftPrepareBatch


def ddim(steps=10):
    s = DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205, clip_sample=False)
    s.set_timesteps(steps)
    return s


class ZeroEps(torch.nn.Module):
    """A deterministic denoiser that predicts ε̂ = 0 everywhere."""

    def forward(self, x, timesteps, context=None):
        return torch.zeros_like(x)


class IdentityAE(torch.nn.Module):
    def decode_stage_2_outputs(self, z):
        return z


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("use_cfg", [False, True])
def test_zero_drift_is_bit_identical_to_stock_sampling(tiny_models, spatial_dims, use_cfg):
    ae, unet, enc = tiny_models(spatial_dims)
    shape = (2, 3) + (8,) * spatial_dims
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    cond = enc.context([{"age": 50, "sex": "F"}, {"age": 90, "sex": "M"}])
    kw = dict(autoencoder_model=ae, diffusion_model=unet, conditioning=cond, verbose=False, cfg=3.0 if use_cfg else None)
    stock = LatentDiffusionInferer(ddim(), scale_factor=0.7).sample(noise.clone(), **kw)
    ours = LatentDriftInferer(ddim(), scale_factor=0.7, drift=0.0).sample(noise.clone(), **kw)
    ours_call = LatentDriftInferer(ddim(), scale_factor=0.7, drift=0.1).sample(noise.clone(), drift=0.0, **kw)
    assert torch.equal(stock, ours) and torch.equal(stock, ours_call)
    drifted = LatentDriftInferer(ddim(), scale_factor=0.7).sample(noise.clone(), drift=0.05, **kw)
    assert not torch.allclose(stock, drifted)


def test_zero_drift_bit_identical_with_stochastic_ddpm(tiny_models):
    ae, unet, enc = tiny_models(2)
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = []
    for inferer in (LatentDiffusionInferer, LatentDriftInferer):
        s = DDPMScheduler(num_train_timesteps=50)
        s.set_timesteps(50)
        torch.manual_seed(7)
        out.append(inferer(s).sample(noise, ae, unet, conditioning=enc.context({"age": 60, "sex": "M"}), verbose=False))
    assert torch.equal(out[0], out[1])


def test_reverse_drift_matches_hand_computed_closed_form():
    """With ε̂ ≡ 0 a DDIM step is z ← sqrt(ᾱ_prev/ᾱ_t)·z, so with LD z ← sqrt(ᾱ_prev/ᾱ_t)·z + δ; check in float64."""
    sched, delta, scale = ddim(10), 0.1, 0.5
    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    out = LatentDriftInferer(sched, scale_factor=scale, drift=delta).sample(noise, IdentityAE(), ZeroEps(), verbose=False)
    a = sched.alphas_cumprod.double()
    z = noise.double()
    r = sched.num_train_timesteps // sched.num_inference_steps
    for t in sched.timesteps.tolist():
        a_prev = a[t - r] if t - r >= 0 else torch.tensor(1.0, dtype=torch.float64)  # set_alpha_to_one
        z = torch.sqrt(a_prev / a[t]) * z + delta
    assert torch.allclose(out.double(), z / scale, atol=1e-5)
    # and the drift is exactly what separates it from the plain run: the sum of per-step δ's, propagated
    plain = LatentDriftInferer(sched, scale_factor=scale).sample(noise, IdentityAE(), ZeroEps(), verbose=False)
    assert (out - plain).mean().item() > 9 * delta / scale  # ≥ N·δ since sqrt(ᾱ_prev/ᾱ_t) ≥ 1


def test_reverse_drift_matches_hand_loop_on_real_unet(tiny_models):
    ae, unet, enc = tiny_models(2)
    sched, delta = ddim(8), -0.07
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    cond = enc.context({"age": 70, "sex": "F"})
    out = LatentDriftInferer(sched, scale_factor=1.3).sample(noise, ae, unet, conditioning=cond, drift=delta, verbose=False)
    with torch.no_grad():
        z = noise
        for t in sched.timesteps:
            eps = unet(z, timesteps=torch.Tensor((t,)), context=cond)
            z = sched.step(eps, t, z)[0] + delta
        ref = ae.decode_stage_2_outputs(z / 1.3)
    assert torch.equal(out, ref)


def test_per_sample_drift_and_other_schedulers(tiny_models):
    ae, unet, enc = tiny_models(2)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for sched in (DDPMScheduler(num_train_timesteps=100), PNDMScheduler(num_train_timesteps=100, skip_prk_steps=True)):
        sched.set_timesteps(10)
        out = LatentDriftInferer(sched).sample(noise, IdentityAE(), ZeroEps(), drift=torch.tensor([0.0, 0.1]), verbose=False)
        assert out.shape == noise.shape and torch.isfinite(out).all()
    # per-sample: row 0 with δ=0 equals the plain run
    s1, s2 = ddim(5), ddim(5)
    a = LatentDriftInferer(s1).sample(noise, IdentityAE(), ZeroEps(), drift=torch.tensor([0.0, 0.1]), verbose=False)
    b = LatentDriftInferer(s2).sample(noise, IdentityAE(), ZeroEps(), verbose=False)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_drifted_scheduler_wrapper_delegates_state():
    s = ddim(10)
    assert with_drift(s, 0.0) is s
    w = with_drift(s, 0.2)
    assert isinstance(w, DriftedScheduler) and torch.equal(w.timesteps, s.timesteps)
    w.set_timesteps(4)
    assert len(s.timesteps) == 4
    x = torch.zeros(1, 1, 2, 2)
    prev, _ = w.step(torch.zeros_like(x), int(s.timesteps[0]), x)
    assert torch.allclose(prev, torch.full_like(x, 0.2))
    with pytest.raises(ValueError, match="already drifted"):
        DriftedScheduler(w, 0.1)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        w.drift = torch.tensor([0.1, 0.2, 0.3])
        w.step(torch.zeros_like(x), int(s.timesteps[0]), x)


@pytest.mark.parametrize("target", ["shifted", "unshifted"])
def test_forward_drift_shifts_added_noise_and_target_follows_option(tiny_models, target):
    """The training path (LatentDriftPrepareBatch feeding MONAI's DiffusionInferer) predicts on add_noise(z0, ε + δ, t)
    and regresses the target forward_drift states."""
    _, unet, enc = tiny_models(2)
    sched, delta = ddim(10), 0.15
    z0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    cond = enc.context([{"age": 50, "sex": "F"}, {"age": 60, "sex": "M"}])
    prepare = LatentDriftPrepareBatch(sched, drift=delta, drift_target=target, condition_dropout=0.0,
                                      generator=torch.Generator().manual_seed(7))
    _, tgt, _, kw = prepare({"image": z0, "condition": cond})
    g = torch.Generator().manual_seed(7)  # the draws prepare made: the noise, then the timesteps
    noise, t = torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (2,), generator=g)
    assert torch.equal(kw["timesteps"], t)
    with torch.no_grad():
        pred = DiffusionInferer(sched)(z0, unet, **kw)
        noisy, expected_tgt = forward_drift(sched, z0, noise, t, delta, target)
        assert torch.allclose(noisy, sched.add_noise(z0, noise + delta, t))
        assert torch.allclose(pred, unet(noisy, timesteps=t, context=cond), atol=1e-6)
    expected = noise + delta if target == "shifted" else noise
    assert torch.equal(tgt, expected) and torch.equal(expected_tgt, expected)
    assert pred.shape == noise.shape


def test_forward_drift_v_prediction_target():
    s = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    z0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([5, 500])
    _, tgt = forward_drift(s, z0, noise, t, 0.1, DriftTarget.SHIFTED)
    assert torch.allclose(tgt, s.get_velocity(z0, noise + 0.1, t))


def test_drift_initial_noise_option():
    sched = ddim(3)
    noise = torch.zeros(1, 3, 2, 2)
    a = LatentDriftInferer(sched, drift=0.1, drift_initial_noise=True).sample(noise, IdentityAE(), ZeroEps(), verbose=False)
    b = LatentDriftInferer(ddim(3), drift=0.1).sample(noise + 0.1, IdentityAE(), ZeroEps(), verbose=False)
    assert torch.equal(a, b)
    assert math.isfinite(a.sum().item())
