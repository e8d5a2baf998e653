"""Training engines: LD prepare-batch, fine-tuning adapters, reproducibility, resume after a kill, torchrun DDP."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from monai_ld import AttributeEncoder, CategoricalAttribute, ConditionalLDM, ContinuousAttribute
from monai_ld.engines import (
    LatentDriftPrepareBatch,
    finetune,
    load_autoencoder,
    merge_adapters,
    prepare_finetune,
    train_autoencoder,
)
from monai_ld.networks import build_unet, unet_config

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
ENC = AttributeEncoder([ContinuousAttribute("age", 40, 95), CategoricalAttribute("sex", ("F", "M"))])


def _samples(n=16, size=16):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(1, size, size, generator=g), "condition": ENC.encode({"age": 40 + 3 * i, "sex": i % 2}).reshape(1, -1)}
            for i in range(n)]


def test_prepare_batch_applies_forward_drift_and_dropout():
    s = DDIMScheduler(num_train_timesteps=1000)
    batch = {"image": torch.randn(64, 3, 4, 4), "condition": ENC.encode_batch([{"age": 50, "sex": "F"}] * 64).unsqueeze(1)}
    for target in ("shifted", "unshifted"):
        pb = LatentDriftPrepareBatch(s, drift=0.1, drift_target=target, condition_dropout=0.5, generator=torch.Generator().manual_seed(0))
        latents, tgt, args, kw = pb(batch)
        assert torch.equal(latents, batch["image"]) and args == ()
        eps = kw["noise"] - 0.1  # what the inferer adds is ε + δ
        assert torch.allclose(tgt, kw["noise"] if target == "shifted" else eps)
        assert abs(eps.mean().item()) < 0.05 and abs(kw["noise"].mean().item() - 0.1) < 0.05
        dropped = ENC.is_null(kw["condition"]).float().mean().item()
        assert 0.25 < dropped < 0.75
        assert kw["timesteps"].shape == (64,) and kw["timesteps"].max() < 1000
    with pytest.raises(ValueError, match="condition_dropout"):
        LatentDriftPrepareBatch(s, condition_dropout=1.5)


def test_prepare_batch_paired_rows_target_the_counterfactual():
    """A paired row: the noisy input is built from the factual latent, and the clean-latent estimate its target implies,
    (z_t - sqrt(1 - ᾱ) target) / sqrt(ᾱ), is the counterfactual; the row keeps its condition. A row that is its own
    counterfactual gets the plain target."""
    s = DDIMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    z, zc = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    zc[32:] = z[32:]  # unpaired rows
    cond = ENC.encode_batch([{"age": 50, "sex": "F"}] * 64).unsqueeze(1)
    batch = {"image": z, "condition": cond, "counterfactual": zc}
    pb = LatentDriftPrepareBatch(s, condition_dropout=0.5, generator=torch.Generator().manual_seed(1),
                                 counterfactual_name="counterfactual")
    latents, tgt, _, kw = pb(batch)
    t = kw["timesteps"]
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noisy = s.add_noise(latents, kw["noise"], t)
    x0 = (noisy - (1 - ab).sqrt() * tgt) / ab.sqrt()
    assert torch.allclose(x0[:32], zc[:32], atol=1e-3 * (1 + (1 / ab[:32]).sqrt().max().item()))
    assert torch.equal(tgt[32:], kw["noise"][32:])
    assert not ENC.is_null(kw["condition"][:32]).any()  # paired rows are never dropped
    assert ENC.is_null(kw["condition"][32:]).any()
    plain = LatentDriftPrepareBatch(s, condition_dropout=0.5, generator=torch.Generator().manual_seed(1))(batch)
    assert torch.equal(plain[1][32:], tgt[32:])  # the same draws: pairing changes only the paired rows
    with pytest.raises(ValueError, match="epsilon"):
        LatentDriftPrepareBatch(DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"),
                                counterfactual_name="counterfactual")


@pytest.mark.parametrize("inject", ["lora", "embedding"])
def test_adapters_merge_into_plain_unet_weights(inject):
    torch.manual_seed(0)
    unet = build_unet(unet_config(2, 3, ENC.dim, "tiny")).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    params = prepare_finetune(unet, inject, lora_rank=2)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)  # pretend training moved the adapters
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in unet.parameters()) == len(params)
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([3, 500]), ENC.context([{"age": 50, "sex": "F"}, None])
    with torch.no_grad():
        before = unet(x, t, context=c)
        merged = merge_adapters(unet)
        after = merged(x, t, context=c)
    assert torch.allclose(before, after, atol=1e-5)
    fresh = build_unet(unet_config(2, 3, ENC.dim, "tiny"))
    fresh.load_state_dict(merged.state_dict())  # plain DiffusionModelUNet weights again
    with pytest.raises(ValueError, match="unknown fine-tuning scheme"):
        prepare_finetune(fresh, "dreambooth")


def test_training_is_reproducible_with_a_seed(tmp_path):
    a = train_autoencoder(_samples(), tmp_path / "a.pt", 2, "tiny", max_iterations=3, batch_size=4, seed=3, progress=False)
    b = train_autoencoder(_samples(), tmp_path / "b.pt", 2, "tiny", max_iterations=3, batch_size=4, seed=3, progress=False)
    (ma, ra), (mb, _) = load_autoencoder(a), load_autoencoder(b)
    assert ra["iterations"] == 3
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k
    c = train_autoencoder(_samples(), tmp_path / "c.pt", 2, "tiny", max_iterations=3, batch_size=4, seed=4, progress=False)
    assert not all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), load_autoencoder(c)[0].state_dict().values()))


def test_finetune_schemes_write_plain_checkpoints(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "2", "2", "100"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    base = ConditionalLDM.load(tmp_path / "model.pt")
    assert base.meta["diffusion_record"]["drift"] == 0.05 and base.scale_factor > 0
    for scheme in ("embedding", "lora"):
        out = finetune(_samples(), tmp_path / "model.pt", tmp_path / f"ft_{scheme}.pt", scheme=scheme, max_iterations=2,
                       batch_size=4, drift=0.1, progress=False)
        m = ConditionalLDM.load(out)
        assert m.meta["finetune"]["scheme"] == scheme and m.drift == 0.1
        changed = [k for k, v in m.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
        if scheme == "embedding":  # only the cross-attention key/value projections moved
            assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
        else:
            assert changed and all(".to_" in k or "out_proj" in k for k in changed)


def test_ema_weights_are_the_running_average_of_the_iterates(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "2", "2", "100"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    base = tmp_path / "model.pt"

    def run(n, ema=None):
        out = finetune(_samples(), base, tmp_path / f"ft{n}_{ema}.pt", scheme="full", max_iterations=n, batch_size=4, lr=1e-2,
                       progress=False, ema_decay=ema, work_dir=tmp_path / f"work{n}_{ema}")
        return ConditionalLDM.load(out)

    d = 0.6
    thetas = [ConditionalLDM.load(base).unet.state_dict()] + [run(n).unet.state_dict() for n in (1, 2, 3)]
    m = run(3, d)
    assert m.meta["finetune_full_record"]["ema_decay"] == d
    for k, v in m.unet.state_dict().items():
        t0, t1, t2, t3 = (t[k].double() for t in thetas)
        expected = d**3 * t0 + (1 - d) * (d**2 * t1 + d * t2 + t3)
        assert torch.allclose(v.double(), expected, atol=1e-5), k
    assert any(not torch.allclose(v, thetas[3][k]) for k, v in m.unet.state_dict().items())  # not the last iterate
    with pytest.raises(ValueError, match="ema_decay"):
        run(1, 1.5)


def _checkpoint_iterations(ckpts: Path) -> list[int]:
    return sorted((int(p.name.split("=")[1][:-3]) for p in ckpts.glob("*_checkpoint_*=*.pt")), reverse=True)


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    ckpts = tmp_path / "model.work" / "checkpoints"
    total = 400
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "2", str(total), "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # the saver keeps only the newest two files, so wait for ANY checkpoint past the first two, not one name
        deadline = time.time() + 240
        while time.time() < deadline and not any(i >= 6 for i in _checkpoint_iterations(ckpts)):
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        assert any(i >= 6 for i in _checkpoint_iterations(ckpts)), "no checkpoint within 240 s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "model.pt").exists()  # killed mid-way: no final model
    # MONAI's CheckpointSaver writes in place, so the kill can truncate the newest file: resume must use the newest
    # READABLE checkpoint
    def readable(iteration):
        try:
            torch.load(next(ckpts.glob(f"*_checkpoint_*={iteration}.pt")), map_location="cpu", weights_only=True)
            return True
        except Exception:
            return False

    last = next(i for i in _checkpoint_iterations(ckpts) if readable(i))
    assert 3 <= last < total
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "2", str(last + 3), "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = ConditionalLDM.load(tmp_path / "model.pt").meta["diffusion_record"]
    assert rec["resumed_from"] == last and rec["iterations"] == last + 3


def test_torchrun_two_processes_gloo(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), str(tmp_path), "2", "3", "100"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("DONE") == 2
    rec = ConditionalLDM.load(tmp_path / "model.pt").meta["diffusion_record"]
    assert rec["world_size"] == 2 and rec["iterations"] == 3
    assert load_autoencoder(tmp_path / "ae.pt")[1]["world_size"] == 2
