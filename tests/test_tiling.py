"""Sliding-window autoencoder (monai_ld.networks.tiling) and the native benchmark's smoke run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.networks.nets import AutoencoderKL

from monai_ld.networks.tiling import TiledAutoencoder, downsample_factor, tile_autoencoder, trained_window

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (40, 48, 40)  # 76 800 voxels: above a 32³ threshold, below 64³


def _ae(local: bool = False, seed: int = 0) -> AutoencoderKL:
    """A tiny real ``AutoencoderKL`` (factor 2). ``local``: GroupNorm -> identity and every 3×3×3 kernel reduced to
    its centre tap, so each output voxel depends on one input voxel (through the stride-2 downsampling and nearest
    upsampling only): tiled must then equal whole exactly, up to the blending's float rounding, and only if every
    window sits on the latent grid at the right scale."""
    torch.manual_seed(seed)
    ae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
                       num_res_blocks=1, attention_levels=(False, False), norm_num_groups=4,
                       with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False).eval()
    if local:
        for m in list(ae.modules()):
            for name, child in list(m.named_children()):
                if isinstance(child, torch.nn.GroupNorm):
                    setattr(m, name, torch.nn.Identity())
        with torch.no_grad():
            for m in ae.modules():
                if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3):
                    centre = torch.randn(m.weight.shape[:2]) / m.weight.shape[1] ** 0.5  # gain ~1 per layer
                    m.weight.zero_()
                    m.weight[..., 1, 1, 1] = centre
    return ae


def _image(shape=SHAPE) -> torch.Tensor:
    """A smooth head-like volume ``(1, 1, *shape)``: a bright ellipsoid with a ripple."""
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return (((g**2).sum(0) < 0.6).float() * 0.8 + 0.1 * torch.sin(6 * g[0]))[None, None]


def test_below_threshold_is_the_plain_autoencoder():
    ae = _ae()
    t = TiledAutoencoder(ae, 16, threshold=math.prod(SHAPE))  # not above: whole volume
    x = _image()
    with torch.no_grad():
        mu, sigma = ae.encode(x)
        assert all(torch.equal(a, b) for a, b in zip(t.encode(x), (mu, sigma))) and t.windows == 0
        assert torch.equal(t.decode(mu), ae.decode(mu)) and t.windows == 0
        assert torch.equal(t.decode_stage_2_outputs(mu), ae.decode_stage_2_outputs(mu))
        torch.manual_seed(1)
        z = t.encode_stage_2_inputs(x)
        torch.manual_seed(1)
        assert torch.equal(z, ae.encode_stage_2_inputs(x))
        assert torch.equal(t.reconstruct(x), ae.reconstruct(x))
    # never tiles without a window, nor when the window covers the volume
    assert TiledAutoencoder(ae, None, threshold=0)._window(SHAPE) is None
    assert TiledAutoencoder(ae, 64, threshold=0)._window(SHAPE) is None


@pytest.mark.parametrize("overlap", [0.25, 0.3, 0.5])
def test_local_network_tiles_exactly(overlap):
    """Window placement and scale: with a pointwise network tiled == whole (0.3 gives an odd scan interval of 11
    image voxels, which the wrapper rounds to 10 to stay on the latent grid)."""
    ae = _ae(local=True)
    t = TiledAutoencoder(ae, 16, threshold=0, overlap=overlap)
    x = torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(0))  # noise: a phase shift would show
    with torch.no_grad():
        mu, sigma = ae.encode(x)
        mu_t, sigma_t = t.encode(x)
        assert t.windows > 8
        torch.testing.assert_close(mu_t, mu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sigma_t, sigma, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t.decode(mu), ae.decode(mu), atol=1e-5, rtol=1e-5)


def test_above_threshold_windows_are_used_and_close(monkeypatch):
    """A real (GroupNorm, 3×3×3) autoencoder above the threshold: same shapes, finite, and the stitched output near
    the whole-volume one. Tolerance: mean |tiled - whole| ≤ 5 % of the output's largest magnitude (measured 1-3 %);
    tiles cannot match exactly because GroupNorm normalises over the window and each window's border sees zero
    padding instead of its neighbours."""
    ae = _ae()
    calls = {"encode": 0, "decode": 0}
    for name in calls:
        fn = getattr(ae, name)

        def spy(z, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(z)

        monkeypatch.setattr(ae, name, spy)
    t = TiledAutoencoder(ae, 16, threshold=32**3, overlap=0.25, sw_batch_size=1)
    x = _image()
    with torch.no_grad():
        mu, _ = ae.encode(x)
        whole = ae.decode(mu)
        calls.update(encode=0, decode=0)
        mu_t, sigma_t = t.encode(x)
        # 16-voxel windows every 12: starts 0,12,24 (40) and 0,12,24,32 (48) -> 3·4·3 windows, one call each
        assert t.windows == 36 and calls["encode"] == 36
        out = t.decode(mu)
        assert t.windows == 36 and calls["decode"] == 36
    assert mu_t.shape == mu.shape and sigma_t.shape == mu.shape and out.shape == whole.shape == x.shape
    assert all(torch.isfinite(v).all() for v in (mu_t, sigma_t, out))
    assert (mu_t - mu).abs().mean() <= 0.05 * mu.abs().max()
    assert (out - whole).abs().mean() <= 0.05 * whole.abs().max()


def test_2d_and_window_validation():
    torch.manual_seed(0)
    ae = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 4, 4), latent_channels=2,
                       num_res_blocks=1, attention_levels=(False, False, False), norm_num_groups=2,
                       with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False).eval()
    assert downsample_factor(ae) == 4
    with pytest.raises(ValueError, match="multiples"):
        TiledAutoencoder(ae, 18)
    t = TiledAutoencoder(ae, (16, 24), threshold=0)
    with torch.no_grad():
        z = t.encode(torch.rand(2, 1, 40, 56))[0]
        assert z.shape == (2, 2, 10, 14) and t.windows > 2
        assert t.decode(z).shape == (2, 1, 40, 56)


def test_state_dict_keys_are_the_autoencoders(tmp_path):
    """A model saved with its autoencoder wrapped is the same file as unwrapped (keys, load both ways)."""
    from monai_ld import ConditionalLDM
    from monai_ld.data.phantoms import brain_attribute_encoder
    from monai_ld.networks import autoencoder_config, unet_config

    enc = brain_attribute_encoder()
    m = ConditionalLDM(autoencoder_config(3, "tiny"), unet_config(3, 3, enc.dim, "tiny"), enc,
                       meta={"preprocessing": {"chain": "brain_mri", "spatial_size": [32, 32, 32]}})
    keys = m.state_dict().keys()
    plain = m.save(tmp_path / "model.pt")
    t = tile_autoencoder(m, plain)
    assert isinstance(m.autoencoder, TiledAutoencoder) and m.state_dict().keys() == keys
    assert t.window == (32, 32, 32) and "grid" in t.window_source  # no record: the model grid (trained whole)
    assert tile_autoencoder(m, plain).ae is t.ae  # idempotent: never a wrapper of a wrapper
    m.save(tmp_path / "wrapped.pt")
    back = ConditionalLDM.load(tmp_path / "wrapped.pt")  # loads into a plain model
    assert all(torch.equal(a, b) for a, b in zip(back.autoencoder.state_dict().values(), t.ae.state_dict().values()))
    m.load_state_dict(back.state_dict())  # and a plain state dict loads into a wrapped one
    assert m.autoencoder.latent_channels == back.autoencoder.latent_channels  # attributes pass through


def test_trained_window_from_the_autoencoder_record(tmp_path):
    """The window is the training patch of the ``autoencoder.pt`` beside the checkpoint, only if it is the same
    network (a campaign model exported next to an older autoencoder keeps its own grid)."""
    from monai_ld import ConditionalLDM
    from monai_ld.data.phantoms import brain_attribute_encoder
    from monai_ld.networks import autoencoder_config, unet_config

    enc = brain_attribute_encoder()
    m = ConditionalLDM(autoencoder_config(3, "tiny"), unet_config(3, 3, enc.dim, "tiny"), enc,
                       meta={"preprocessing": {"chain": "brain_mri", "spatial_size": [64, 64, 64]}})
    ckpt = m.save(tmp_path / "model.pt")
    record = {"format": "monai_ld.autoencoder/1", "config": m.autoencoder_config, "record": {"patch_size": [16, 16, 16]}}
    torch.save({**record, "state_dict": m.autoencoder.state_dict()}, tmp_path / "autoencoder.pt")
    assert trained_window(m, ckpt)[0] == (16, 16, 16)
    other = {k: v + 1 for k, v in m.autoencoder.state_dict().items()}
    torch.save({**record, "state_dict": other}, tmp_path / "autoencoder.pt")
    assert trained_window(m, ckpt)[0] == (64, 64, 64)
    m.meta["tiling"] = {"window": [24, 24, 24]}
    assert trained_window(m, ckpt)[0] == (24, 24, 24)


def test_shipped_brain_model_window():
    """The shipped brain autoencoder (the campaign's, 2× downsampling) was trained on whole 64³ volumes, so it encodes
    and decodes them whole: its window is the volume, not a patch."""
    ckpt = ROOT / "bundles" / "brain_mri_counterfactual" / "models" / "model.pt"
    if not ckpt.is_file():
        pytest.skip("brain bundle not present")
    from monai_ld.pipeline import CounterfactualPipeline

    pipe = CounterfactualPipeline.from_checkpoint(ckpt, tile_threshold=0)
    ae = pipe.model.autoencoder
    assert isinstance(ae, TiledAutoencoder) and ae.window == (64, 64, 64) and ae.factor == 2 and ae.threshold == 0


def _bench_quick() -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_native.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.slow
def test_bench_native_quick():
    """``bench_native.py --quick`` runs end to end and prints every section with its bar (about 5 min on one CPU
    thread: seven fresh processes, each loading torch, MONAI and the model; hence slow, not under 60 s)."""
    t0 = time.perf_counter()
    r = _bench_quick()
    assert r.returncode == 0, r.stderr[-3000:]
    for needle in ("(a) 1 mm counterfactual", "(b) decode", "(c) cohort", "bar"):
        assert needle in r.stdout, r.stdout
    print(f"bench_native --quick: {time.perf_counter() - t0:.0f} s")
