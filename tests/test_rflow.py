"""Latent Drifting with MONAI's rectified flow (``RFlowScheduler``): sampling, forward drift, flow inversion."""

import pytest
import torch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import RFlowScheduler

from monai_ld import DriftedScheduler, LatentDriftInferer, forward_drift
from monai_ld.engines.prepare_batch import LatentDriftPrepareBatch
from monai_ld.inferers import make_inferer
from monai_ld.networks import build_scheduler, scheduler_config
from monai_ld.schedulers import next_timesteps


def rflow(steps=10, **kw):
    return build_scheduler({**scheduler_config("RFlow", num_inference_steps=steps), **kw})


class IdentityAE(torch.nn.Module):
    def decode_stage_2_outputs(self, z):
        return z


@pytest.mark.parametrize("use_cfg", [False, True])
def test_zero_drift_is_bit_identical_to_stock_rflow_sampling(tiny_models, use_cfg):
    ae, unet, enc = tiny_models(2)
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    cond = enc.context([{"age": 50, "sex": "F"}, {"age": 90, "sex": "M"}])
    kw = dict(autoencoder_model=ae, diffusion_model=unet, conditioning=cond, verbose=False, cfg=3.0 if use_cfg else None)
    stock = LatentDiffusionInferer(rflow(7), scale_factor=0.7).sample(noise, **kw)
    ours = LatentDriftInferer(rflow(7), scale_factor=0.7, drift=0.0).sample(noise, **kw)
    # the wrapper at δ=0 (it infers next_timestep, which MONAI's inferer withholds from a non-RFlowScheduler)
    wrapped = LatentDiffusionInferer(rflow(7), scale_factor=0.7).sample(noise, scheduler=DriftedScheduler(rflow(7), 0.0), **kw)
    assert torch.equal(stock, ours) and torch.equal(stock, wrapped)


def test_drifted_rflow_equals_hand_loop(tiny_models):
    """δ ≠ 0: z ← z + v̂(z, t)·(t - next)/T + δ after every Euler step, written out by hand."""
    _, unet, enc = tiny_models(2)
    # resolution-shifted timesteps: the step sizes differ from the uniform 1/N RFlowScheduler assumes without next_t
    sched = rflow(6, use_timestep_transform=True, input_img_size_numel=64, base_img_size_numel=16, spatial_dim=2)
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    cond = enc.context({"age": 70, "sex": "M"})
    delta = 0.07
    out = LatentDriftInferer(sched, drift=delta).sample(noise, IdentityAE(), unet, conditioning=cond, verbose=False)
    z = noise
    with torch.no_grad():
        for t, nxt in zip(sched.timesteps, next_timesteps(sched.timesteps)):
            v = unet(z, timesteps=torch.Tensor((t,)), context=cond)
            z = z + v * (float(t - nxt) / 1000) + delta
    assert torch.allclose(out, z, atol=1e-6)
    assert not torch.allclose(out, LatentDriftInferer(sched).sample(noise, IdentityAE(), unet, conditioning=cond, verbose=False))


@pytest.mark.parametrize("target", ["shifted", "unshifted"])
def test_rflow_forward_drift_draws_the_noise_endpoint_around_delta(target):
    sched = rflow()
    z0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 500, 999])
    noisy, tgt = forward_drift(sched, z0, eps, t, 0.1, target)
    s = (t.float() / 1000).reshape(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - s) * z0 + s * (eps + 0.1), atol=1e-6)
    assert torch.allclose(tgt, z0 - eps - (0.1 if target == "shifted" else 0.0), atol=1e-6)
    plain, plain_tgt = forward_drift(sched, z0, eps, t, 0.0)  # δ = 0: MONAI's own RFlow training pair
    assert torch.equal(plain, sched.add_noise(z0, eps, t)) and torch.equal(plain_tgt, z0 - eps)
    # the training engine's prepare-batch goes through the same path
    batch = {"image": z0, "condition": torch.zeros(3, 1, 4)}
    _, target_pb, _, kw = LatentDriftPrepareBatch(sched, drift=0.1, drift_target=target, condition_dropout=0.0,
                                                  generator=torch.Generator().manual_seed(0))(batch)
    assert torch.allclose(target_pb, z0 - kw["noise"] + (0.0 if target == "shifted" else 0.1), atol=1e-6)


def test_rflow_config_and_errors():
    s = rflow(5)
    assert isinstance(s, RFlowScheduler) and s.timesteps.tolist() == [1000, 800, 600, 400, 200]
    brain_dict = {**scheduler_config(), "name": "RFlow", "prediction_type": "v_prediction"}  # betas ignored
    assert isinstance(build_scheduler(brain_dict), RFlowScheduler)
    with pytest.raises(ValueError, match="v_prediction"):
        build_scheduler({**scheduler_config(), "name": "RFlow"})  # an epsilon dict would train the wrong target
    with pytest.raises(ValueError, match="input_img_size_numel"):
        rflow(use_timestep_transform=True)
    tr = rflow(5, use_timestep_transform=True, input_img_size_numel=16**3, base_img_size_numel=8**3)
    assert tr.timesteps[1] > 800  # more steps at the noisy end for a larger volume
    with pytest.raises(ValueError, match="not among"):
        DriftedScheduler(s, 0.1).step(torch.zeros(1, 1, 2, 2), 999, torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_flow_inversion_then_sampling_reconstructs_the_latent(tiny_models, strength):
    """Invert z_0 (the ODE backwards, 0 -> s) and sample back under the same condition: the round trip closes up to
    how much the velocity changes between neighbouring levels, so the error shrinks with the number of steps."""
    _, unet, enc = tiny_models(2)
    z0 = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    cond = enc.context([{"age": 45, "sex": "F"}, {"age": 85, "sex": "M"}])
    errors = []
    for steps in (8, 32):
        inf = LatentDriftInferer(rflow(steps))
        inv = inf.invert(unet, latents=z0, conditioning=cond, strength=strength)
        assert len(inv.timesteps) == round(strength * steps)
        rec = inf.denoise(inv.latent, unet, inv.timesteps, cond)
        errors.append(float((rec - z0).abs().max() / z0.abs().max()))
        assert not torch.allclose(inv.latent, z0, atol=1e-2)  # it did move
    assert errors[1] < errors[0] and errors[1] < 0.01, errors
    # with drift: inverting with -δ undoes drifted sampling exactly as well
    inf = LatentDriftInferer(rflow(32), drift=0.05)
    inv = inf.invert(unet, latents=z0, conditioning=cond, strength=strength, drift=-0.05)
    assert float((inf.denoise(inv.latent, unet, inv.timesteps, cond) - z0).abs().max() / z0.abs().max()) < 0.02


def test_rflow_counterfactual_runs_both_abductions(tiny_models):
    ae, unet, enc = tiny_models(2)
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    src, tgt = enc.context({"age": 50, "sex": "F"}), enc.context({"age": 90, "sex": "F"})
    inf = LatentDriftInferer(rflow(8), drift=0.05)
    for abduction in ("inversion", "noising"):
        out = inf.counterfactual(x, ae, unet, src, tgt, strength=0.5, guidance_scale=2.0, abduction=abduction,
                                 generator=torch.Generator().manual_seed(0))
        assert out.image.shape == x.shape and out.settings["steps"] == 4 and torch.isfinite(out.image).all()
        assert not torch.allclose(out.latents["counterfactual"], out.latents["source"])


def test_train_diffusion_with_an_rflow_scheduler_dict_and_edit(tmp_path):
    """What a bundle's train config does with ``"scheduler": {"name": "RFlow", ...}``: LD training, then the saved
    model's own inferer inverts and edits with rectified flow."""
    from monai_ld import AttributeEncoder, CategoricalAttribute, ConditionalLDM, ContinuousAttribute
    from monai_ld.engines import train_autoencoder, train_diffusion

    enc = AttributeEncoder([ContinuousAttribute("age", 40, 95), CategoricalAttribute("sex", ("F", "M"))])
    g = torch.Generator().manual_seed(0)
    samples = [{"image": torch.rand(1, 16, 16, generator=g), "condition": enc.encode({"age": 40 + 5 * i, "sex": i % 2}).reshape(1, -1)}
               for i in range(8)]
    ae = train_autoencoder(samples, tmp_path / "ae.pt", 2, "tiny", max_iterations=1, batch_size=4, progress=False)
    out = train_diffusion(samples, ae, tmp_path / "model.pt", enc, size="tiny", max_iterations=2, batch_size=4, drift=0.05,
                          progress=False, scheduler={**scheduler_config("RFlow", num_inference_steps=6)})
    model = ConditionalLDM.load(out)
    assert model.scheduler_config["name"] == "RFlow" and model.meta["diffusion_record"]["drift"] == 0.05
    inf = make_inferer(model)
    assert isinstance(inf.scheduler, RFlowScheduler)
    x = samples[0]["image"][None]
    cf = inf.counterfactual(x, model.autoencoder, model.unet, enc.context({"age": 40, "sex": "F"}),
                            enc.context({"age": 90, "sex": "F"}), strength=0.5, guidance_scale=2.0)
    assert cf.image.shape == x.shape and cf.settings["steps"] == 3
