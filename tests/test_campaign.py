"""The training campaign: resumable across sessions (kill -9 loses at most one interval, the resumed run is
bit-identical to the uninterrupted one), a learning-rate schedule, a committed log, honest splits."""

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_ld import bundle_support
from monai_ld.cli import main as cli_main
from monai_ld.data.phantoms.writer import write_phantom_dataset
from monai_ld.engines.campaign import RngState, StagePlan, warmup_cosine

BRAIN = Path(__file__).resolve().parents[1] / "bundles" / "brain_mri_counterfactual"
TINY = [
    "--phantoms#n", "8", "--phantoms#size", "24", "--preprocessing_spec#spatial_size", "[16,16,16]",
    "--preprocessing_spec#pixdim", "[11.5,11.5,11.5]",
    "--autoencoder#config", "{'spatial_dims': 3, 'in_channels': 1, 'out_channels': 1, 'latent_channels': 4, "
    "'channels': [8, 16], 'num_res_blocks': 1, 'attention_levels': [False, False], 'norm_num_groups': 8, "
    "'with_encoder_nonlocal_attn': False, 'with_decoder_nonlocal_attn': False}",
    "--autoencoder#total_iterations", "6", "--autoencoder#batch_size", "2", "--autoencoder#patch_size", "[8,8,8]",
    "--autoencoder#warmup", "2",
    "--diffusion#unet", "{'spatial_dims': 3, 'in_channels': 4, 'out_channels': 4, 'channels': [16, 32], "
    "'num_res_blocks': 1, 'attention_levels': [False, True], 'norm_num_groups': 8, 'num_head_channels': [0, 16], "
    "'with_conditioning': True, 'cross_attention_dim': 6}",
    "--diffusion#total_iterations", "4", "--diffusion#batch_size", "2", "--diffusion#warmup", "1",
    "--diffusion#train_extra#n", "3", "--diffusion#require_ceiling", "False", "--save_every_iterations", "2",
    "--diffusion#pairs", "$None",  # the bundle trains on longitudinal pairs; the test that adds them sets its own
    "--decoder#total_iterations", "4", "--decoder#batch_size", "2", "--decoder#warmup", "1",
    "--decoder#train_extra_images", "2",
    "--threads", "1",
]


def _bundle(root: Path) -> Path:
    b = root / "brain"
    (b / "configs").mkdir(parents=True)
    for f in ("common.json", "campaign.json", "metadata.json", "logging.conf"):
        shutil.copy(BRAIN / "configs" / f, b / "configs" / f)
    return b


def _configs(b: Path) -> str:
    """campaign.json over the bundle's common.json, as ``monai-ld train --campaign`` merges them."""
    return str([str(b / "configs" / "common.json"), str(b / "configs" / "campaign.json")])


def _cmd(b: Path) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs(b),
            "--meta_file", str(b / "configs" / "metadata.json"), *TINY]


def _state(b: Path, name: str) -> dict:
    return torch.load(b / "campaign" / f"{name}.state.pt", map_location="cpu", weights_only=True)


def test_campaign_resumes_bit_identical_after_kill(tmp_path):
    a, b = _bundle(tmp_path / "a"), _bundle(tmp_path / "b")
    subprocess.run(_cmd(a), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_cmd(b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_row = b / "docs" / "training_log.csv"  # written right after the first state file
    t0 = time.monotonic()
    while not first_row.is_file() and proc.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    killed_at = _state(b, "autoencoder")["trainer"]["iteration"]
    assert killed_at >= 2
    subprocess.run(_cmd(b), check=True, capture_output=True, timeout=300)
    for name, total in (("autoencoder", 6), ("diffusion", 4), ("decoder", 4)):
        sa, sb = _state(a, name), _state(b, name)
        assert sa["trainer"]["iteration"] == sb["trainer"]["iteration"] == total
        for key in ("network", "ema", "optimizer"):
            if key in sa:
                flat_a, flat_b = _tensors(sa[key]), _tensors(sb[key])
                assert len(flat_a) == len(flat_b) > 0
                assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), f"{name} {key} differs after resume"
    assert "ema" in _state(a, "diffusion") and _state(a, "diffusion")["meta"]["scale_factor"] > 0
    # the diffusion state keeps Adam's moments in bfloat16 (campaign.json), the weights and EMA in float32
    d_opt = _state(a, "diffusion")["optimizer"]["state"][0]
    assert d_opt["exp_avg"].dtype == d_opt["exp_avg_sq"].dtype == torch.bfloat16
    assert _state(a, "diffusion")["network"]["conv_in.conv.weight"].dtype == torch.float32
    assert _state(a, "diffusion")["meta"]["train_samples"] == 6 + 3  # the train split + every subject of the extra set
    rows = list(csv.DictReader(open(a / "docs" / "training_log.csv")))
    assert [(r["stage"], r["iteration"]) for r in rows] == [("autoencoder", "2"), ("autoencoder", "4"),
                                                           ("autoencoder", "6"), ("diffusion", "2"), ("diffusion", "4"),
                                                           ("decoder", "2"), ("decoder", "4")]
    ae_rows = [r for r in rows if r["stage"] == "autoencoder"]
    for r in ae_rows:  # val reconstruction and the ceiling on val's ground-truth pairs, at every checkpoint
        assert all(np.isfinite(float(r[k])) for k in ("val_recon_l1", "val_input_l1", "val_oracle_l1", "val_oracle_region_l1"))
    assert float(ae_rows[-1]["lr"]) < float(ae_rows[0]["lr"])  # the schedule decays
    assert all(np.isfinite(float(r[k])) for r in rows if r["stage"] == "diffusion" for k in ("val_loss", "val_condition_gain"))
    # the gate before the diffusion stage: the autoencoder's ceiling on val pairs must beat the input
    from monai_ld.campaign import _ceiling_not_met

    m = _state(a, "autoencoder")["metrics"]
    why = _ceiling_not_met(a / "campaign")
    assert (why is None) == (m["val_oracle_region_l1"] < m["val_input_l1"])
    assert why is None or "not below the input's L1" in why
    rows_b = list(csv.DictReader(open(b / "docs" / "training_log.csv")))
    # appended, never rewritten: the killed run's first row stays, the resumed run adds its own
    its_b = [(r["stage"], r["iteration"]) for r in rows_b]
    assert its_b[0] == ("autoencoder", "2") and its_b[-6:] == [("autoencoder", "4"), ("autoencoder", "6"),
                                                                 ("diffusion", "2"), ("diffusion", "4"),
                                                                 ("decoder", "2"), ("decoder", "4")]
    # a complete campaign resumes to nothing and exports one model checkpoint
    out = subprocess.run(_cmd(a), check=True, capture_output=True, text=True, timeout=300)
    assert len(list(csv.DictReader(open(a / "docs" / "training_log.csv")))) == 7, out.stderr[-2000:]
    from monai_ld.campaign import export_model
    from monai_ld.networks.model import ConditionalLDM

    cfg = json.loads((a / "configs" / "common.json").read_text())
    path = export_model(a / "campaign", tmp_path / "model.pt", cfg["attributes"],
                        {**cfg["preprocessing_spec"], "spatial_size": [16] * 3})
    m = ConditionalLDM.load(path)
    assert m.meta["campaign"]["diffusion"]["iterations"] == 4
    assert all(torch.equal(m.unet.state_dict()[k], v) for k, v in _state(a, "diffusion")["ema"].items())
    # the decoder stage: the exported autoencoder is the campaign's encoder with the fine-tuned decoder
    dec, enc = _state(a, "decoder"), _state(a, "autoencoder")
    assert m.meta["campaign"]["decoder"]["iterations"] == 4 and dec["meta"]["train_samples"] == 6 + 2
    ae_sd = m.autoencoder.state_dict()
    assert set(dec["ema"]) == {k for k in ae_sd if k.startswith(("decoder.", "post_quant_conv."))}
    assert all(torch.equal(ae_sd[k], v) for k, v in dec["ema"].items())
    assert not all(torch.equal(enc["network"][k], v) for k, v in dec["ema"].items())  # it trained
    assert all(torch.equal(ae_sd[k], v) for k, v in enc["network"].items() if k not in dec["ema"])  # encoder frozen
    assert all(np.isfinite(float(r["val_oracle_region_l1"])) for r in rows if r["stage"] == "decoder")
    # the CLI exports the campaign that --set names (it once exported the bundle's own campaign, silently)
    from monai_ld.cli import main

    assert main(["train", "--bundle", "brain", "--campaign", "--set", f"campaign_dir={a / 'campaign'}",
                 "--export", str(tmp_path / "cli.pt")]) == 0
    assert ConditionalLDM.load(tmp_path / "cli.pt").meta["campaign"]["diffusion"]["iterations"] == 4


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_campaign_grows_a_condition_embedding_and_continues(tmp_path):
    """Adding ``"condition_embedding": true`` to the diffusion UNet's config continues the stage from its state: the
    trained weights, EMA and Adam moments are kept (the new layer starts at zero, so the network computes what it
    did), the iteration count goes on, and the new path trains. Any other change to the UNet config is one error."""
    from monai_ld.engines.campaign import grow_state
    from monai_ld.networks.presets import build_unet

    b = _bundle(tmp_path)
    subprocess.run(_cmd(b), check=True, capture_output=True, timeout=300)
    before = _state(b, "diffusion")
    unet = dict(before["meta"]["unet"])
    old, new = build_unet(unet), build_unet({**unet, "condition_embedding": True})
    grown = grow_state(before, old, new)
    old.load_state_dict(before["ema"])
    new.load_state_dict(grown["ema"])
    x, t, c = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 600]), torch.rand(2, 1, unet["cross_attention_dim"])
    assert torch.equal(old(x, t, context=c), new(x, t, context=c))
    opt = torch.optim.Adam(new.parameters())
    opt.load_state_dict(grown["optimizer"])  # moments at their new positions
    by_name = dict(zip([n for n, _ in new.named_parameters()], opt.param_groups[0]["params"]))
    first = next(n for n, _ in old.named_parameters())
    assert torch.allclose(opt.state[by_name[first]]["exp_avg"].float(), before["optimizer"]["state"][0]["exp_avg"].float())

    grow = ["--diffusion#unet#condition_embedding", "True", "--diffusion#total_iterations", "6"]
    r = subprocess.run(_cmd(b) + grow, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _state(b, "diffusion")
    assert after["trainer"]["iteration"] == 6 and after["meta"]["condition_embedding_from"] == 4
    assert after["meta"]["unet"]["condition_embedding"] is True
    assert after["network"]["class_embedding.2.weight"].abs().sum() > 0  # the new path trained from zero
    r = subprocess.run(_cmd(b) + grow + ["--diffusion#unet#channels", "[8, 16]"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "only adding" in r.stderr


def test_campaign_adds_longitudinal_pairs_to_a_running_stage(tmp_path):
    """``diffusion.pairs`` renders another seed's subjects with a changed-attribute partner each and trains on them
    (both images under their own condition, and each under the other's condition with the other as its target);
    added to a running stage, it continues from the saved iteration and records where the pairs began."""
    b = _bundle(tmp_path)
    subprocess.run(_cmd(b), check=True, capture_output=True, timeout=300)
    cmd = _cmd(b)
    cmd[cmd.index("--diffusion#pairs") + 1] = f"{{'data_dir': '{tmp_path / 'pairs'}', 'n': 3, 'size': 24, 'seed': 2}}"
    r = subprocess.run(cmd + ["--diffusion#total_iterations", "6"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _state(b, "diffusion")
    assert after["trainer"]["iteration"] == 6 and after["meta"]["pairs_from"] == 4 and after["meta"]["pairs"]["n"] == 3
    rows = list(csv.DictReader(open(tmp_path / "pairs" / "manifest.csv")))
    assert len(rows) == 6 and sum(bool(r["counterfactual_of"]) for r in rows) == 3
    assert "12 paired samples from 3 longitudinal pairs" in r.stdout + r.stderr
    # a larger pair set later on: the record keeps which set trained which iterations
    cmd[cmd.index("--diffusion#pairs") + 1] = f"{{'data_dir': '{tmp_path / 'pairs'}', 'n': 4, 'size': 24, 'seed': 2}}"
    r = subprocess.run(cmd + ["--diffusion#total_iterations", "7"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = _state(b, "diffusion")["meta"]
    assert meta["pairs"]["n"] == 4 and meta["pairs_from"] == 6 and "data_dir" not in meta["pairs"]  # a clone's path
    assert [(h["n"], h["from"], h["to"]) for h in meta["pairs_history"]] == [(3, 4, 6)]
    assert "16 paired samples from 4 longitudinal pairs" in r.stdout + r.stderr


def test_compact_optimizer_state_loads_back_as_float32():
    from monai_ld.engines.campaign import _compact

    net = torch.nn.Linear(64, 64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        net(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
    full = opt.state_dict()
    small = _compact(full, torch.bfloat16)
    assert full["state"][0]["exp_avg"].dtype == torch.float32  # the live state is untouched
    opt2 = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt2.load_state_dict(small)
    for p, (i, ref) in zip(net.parameters(), full["state"].items()):
        got = opt2.state[p]
        assert got["exp_avg"].dtype == torch.float32 and torch.equal(got["step"], ref["step"])
        assert torch.allclose(got["exp_avg"], ref["exp_avg"], rtol=1e-2, atol=1e-8)
        assert torch.allclose(got["exp_avg_sq"], ref["exp_avg_sq"], rtol=1e-2, atol=1e-12)


def test_autocast_inferer_trains_in_bfloat16_with_float32_weights():
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    from monai_ld.engines.campaign import AutocastInferer
    from monai_ld.networks.presets import build_unet

    torch.manual_seed(0)
    unet = build_unet({"spatial_dims": 3, "in_channels": 2, "out_channels": 2, "channels": [8, 16], "num_res_blocks": 1,
                       "attention_levels": [False, False], "norm_num_groups": 8})
    seen = []
    unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    inferer = AutocastInferer(DiffusionInferer(DDPMScheduler(num_train_timesteps=100)), "bfloat16", "cpu")
    x, noise = torch.randn(2, 2, 8, 8, 8), torch.randn(2, 2, 8, 8, 8)
    out = inferer(x, unet, noise=noise, timesteps=torch.tensor([3, 50]))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32  # computed in bf16, handed to the loss in fp32
    ((out - noise) ** 2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)


def test_warmup_cosine_schedule():
    f = warmup_cosine(StagePlan(total_iterations=100, lr=1.0, warmup=10, final_lr_fraction=0.1))
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_iterations"):
        StagePlan(total_iterations=0, lr=1e-3)


def test_rng_state_round_trip(tmp_path):
    g = torch.Generator().manual_seed(3)
    rs = np.random.RandomState(5)
    rng = RngState({"g": g}, {"crop": rs})
    torch.save(rng.state_dict(), tmp_path / "s.pt")
    first = (torch.rand(3), np.random.rand(), torch.rand(2, generator=g), rs.rand())
    torch.rand(7), np.random.rand(4), torch.rand(5, generator=g), rs.rand(3)
    rng.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(), torch.rand(2, generator=g), rs.rand())
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and torch.equal(first[2], again[2]) and first[3] == again[3]


def test_val_pairs_leave_test_rows_unchanged(tmp_path):
    m1 = write_phantom_dataset("brain", tmp_path / "t", n=8, size=16, seed=0)
    m2 = write_phantom_dataset("brain", tmp_path / "vt", n=8, size=16, seed=0, counterfactual_splits=("val", "test"))
    r1, r2 = list(csv.DictReader(open(m1))), list(csv.DictReader(open(m2)))
    assert {r["split"] for r in r2 if r["counterfactual_of"]} == {"val", "test"}
    assert [r for r in r2 if r["split"] != "val"] == [r for r in r1 if r["split"] != "val"]  # test pairs, train: same rows
    drop = ("gt_pair_id",)  # val factual rows now name their pair
    assert [{k: v for k, v in r.items() if k not in drop} for r in r2 if r["split"] == "val" and not r["counterfactual_of"]] \
        == [{k: v for k, v in r.items() if k not in drop} for r in r1 if r["split"] == "val"]
    test_cf = [r for r in r1 if r["counterfactual_of"]][0]["path"]
    assert (tmp_path / "t" / test_cf).read_bytes() == (tmp_path / "vt" / test_cf).read_bytes()
    with pytest.raises(ValueError, match="counterfactual_splits"):
        write_phantom_dataset("brain", tmp_path / "x", n=3, size=16, counterfactual_splits=("holdout",))


def test_ensure_phantoms_regenerates_other_settings(tmp_path):
    d = str(tmp_path / "data")
    m = bundle_support.ensure_phantoms(d, "brain", 6, 16, 0)
    assert not any(r["split"] == "val" and r["counterfactual_of"] for r in csv.DictReader(open(m)))
    stamp = Path(m).stat().st_mtime_ns
    assert bundle_support.ensure_phantoms(d, "brain", 6, 16, 0) == m and Path(m).stat().st_mtime_ns == stamp  # cached
    bundle_support.ensure_phantoms(d, "brain", 6, 16, 0, ("val", "test"))
    assert any(r["split"] == "val" and r["counterfactual_of"] for r in csv.DictReader(open(m)))


def test_campaign_cli_errors(capsys):
    assert cli_main(["train", "--bundle", "cxr", "--campaign"]) == 2
    assert "no training campaign" in capsys.readouterr().err
    assert cli_main(["train", "--bundle", "brain", "--budget-min", "5"]) == 2
    assert "--campaign" in capsys.readouterr().err
    assert cli_main(["train", "--bundle", "brain", "--campaign", "--nproc", "2", "--drift", "0.1"]) == 2
    assert "--drift, --nproc do(es) not apply to --campaign" in capsys.readouterr().err
    assert cli_main(["train", "--bundle", "brain", "--stage", "decoder"]) == 2
    assert "add --campaign" in capsys.readouterr().err


@pytest.mark.slow
def test_campaign_config_at_its_real_sizes(tmp_path):
    """The shipped campaign config's own networks and grid (64³, 2× autoencoder, 32³ latents), two iterations per
    stage on a few subjects: catches a config that cannot run (shapes, attention, memory) before a long campaign."""
    b = _bundle(tmp_path)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs(b),
           "--meta_file", str(b / "configs" / "metadata.json"), "--phantoms#n", "8", "--diffusion#train_extra#n", "2",
           "--autoencoder#total_iterations", "2", "--autoencoder#warmup", "1", "--autoencoder#val_images", "2",
           "--autoencoder#val_pairs", "1", "--diffusion#total_iterations", "2", "--diffusion#warmup", "1",
           "--diffusion#val_images", "2", "--diffusion#require_ceiling", "False", "--save_every_iterations", "2",
           "--diffusion#pairs", "$None",  # rendering 500 pairs at 64³ is the campaign's job, not this check's
           "--decoder#train_extra_images", "2", "--decoder#total_iterations", "2",
           "--decoder#warmup", "1", "--decoder#val_images", "2", "--decoder#val_pairs", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
    d = _state(b, "diffusion")
    assert d["trainer"]["iteration"] == 2 and d["meta"]["train_samples"] == 6 + 2
    assert d["meta"]["unet"]["in_channels"] == 4  # the 2× autoencoder's 4 latent channels
    rows = list(csv.DictReader(open(b / "docs" / "training_log.csv")))
    assert [r["stage"] for r in rows] == ["autoencoder", "diffusion", "decoder"]
