"""The shipped bundles: metadata validates offline, inference runs through `python -m monai.bundle run` and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = ROOT / "bundles"
SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
REAL_SCAN = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("name", ["brain_mri_counterfactual", "chest_xray_counterfactual"])
def test_metadata_verifies_offline(name, tmp_path):
    if not SCHEMA.is_file():
        pytest.skip(f"schema copy not found at {SCHEMA}")
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
                        str(BUNDLES / name / "configs" / "metadata.json"), "--filepath", str(SCHEMA)],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and "metadata is verified with no error" in r.stdout + r.stderr, r.stderr[-2000:]


def bundle_run(name: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of the bundle's inference: ``configs/common.json`` + ``configs/inference.json``."""
    configs = [str(BUNDLES / name / "configs" / c) for c in ("common.json", "inference.json")]
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs), *overrides],
                          capture_output=True, text=True, timeout=600, cwd=cwd, env=ENV)


def test_brain_bundle_run_on_a_real_scan_keeps_geometry(tmp_path):
    out = tmp_path / "out"
    r = bundle_run("brain_mri_counterfactual", "--input", str(REAL_SCAN), "--output_dir", str(out),
                   "--settings#num_inference_steps", "5", "--source", "{'age': 40, 'sex': 'M', 'diagnosis': 'CN'}",
                   "--target", "{'age': 90, 'diagnosis': 'AD'}", "--settings#drift", "0.05", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    src, cf, diff = nib.load(REAL_SCAN), nib.load(out / "counterfactual.nii.gz"), nib.load(out / "difference.nii.gz")
    assert cf.shape == src.shape and diff.shape == src.shape
    assert np.allclose(cf.affine, src.affine, atol=1e-4)
    assert nib.aff2axcodes(cf.affine) == nib.aff2axcodes(src.affine)
    # native output space (the default since issue #16): the input's own dtype (int16, stored big-endian) and units,
    # where the former whole-volume output was float32 on the model's [0, 1] scale
    assert cf.get_data_dtype() == src.get_data_dtype().newbyteorder("=")
    assert np.abs(diff.get_fdata()).max() > 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["drift"] == 0.05 and rec["target"]["diagnosis"] == "AD" and rec["num_inference_steps"] == 5
    assert rec["output_space"] == "native" and rec["changed_voxels"] == np.count_nonzero(diff.get_fdata())
    assert Image.open(out / "figure.png").size[0] > 100


def test_brain_bundle_components_override_from_the_command_line(tmp_path):
    """The inference config is MONAI components (model, scheduler, inferer, preprocessing, settings, pipeline): the
    inferer's δ and the scheduler itself are overridden like a model-zoo bundle's (stochastic abduction, so that the
    DDPM scheduler, which cannot invert, runs the same edit)."""
    runs = {"base": [], "drift": ["--inferer#drift", "0.1"],
            "ddpm": ["--scheduler#_target_", "monai.networks.schedulers.DDPMScheduler"]}
    out = {}
    for name, extra in runs.items():
        r = bundle_run("brain_mri_counterfactual", "--output_dir", str(tmp_path / name), "--settings#num_inference_steps",
                       "2", "--settings#abduction", "noising", *extra, cwd=tmp_path)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        rec = json.loads((tmp_path / name / "record.json").read_text())
        out[name] = (rec, np.asarray(nib.load(tmp_path / name / "counterfactual.nii.gz").dataobj))
    assert [out[k][0]["drift"] for k in runs] == [0.0, 0.1, 0.0]
    assert [out[k][0]["scheduler"] for k in runs] == ["DDIMScheduler", "DDIMScheduler", "DDPMScheduler"]
    assert all(out[k][0]["num_inference_steps"] == 2 and out[k][0]["guidance_scale"] is None for k in runs)  # the bundle: no CFG
    assert not np.array_equal(out["base"][1], out["drift"][1]) and not np.array_equal(out["base"][1], out["ddpm"][1])


def test_demo_and_cxr_counterfactual_cli(tmp_path):
    exe = [sys.executable, "-m", "monai_ld.cli"]
    r = subprocess.run(exe + ["demo", "--output-dir", str(tmp_path / "demo"), "--steps", "5"], capture_output=True,
                       text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    sample = BUNDLES / "brain_mri_counterfactual" / "sample_data" / "phantom_test_subject.nii.gz"
    assert nib.load(tmp_path / "demo" / "counterfactual.nii.gz").shape == nib.load(sample).shape
    src = BUNDLES / "chest_xray_counterfactual" / "sample_data" / "phantom_test_radiograph.png"
    r = subprocess.run(exe + ["counterfactual", "--bundle", "cxr", "--input", str(src), "--target", "pleural_effusion=1",
                              "--source", "sex=F", "--source", "age=56.9", "--source", "cardiomegaly=0",
                              "--source", "pleural_effusion=0", "--source", "pneumonia=0", "--steps", "5",
                              "--output-dir", str(tmp_path / "cxr")], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    written = Image.open(tmp_path / "cxr" / "counterfactual.png")
    # the sample is a 16-bit radiograph: the counterfactual keeps 16 bits
    assert written.size == Image.open(src).size and np.asarray(written).dtype == np.uint16
    # the CXR bundle localises its edits by default: outside the mask's region the input is kept exactly (an
    # unmasked edit changes every pixel)
    rec = json.loads((tmp_path / "cxr" / "record.json").read_text())
    assert rec["mask_threshold"] == 0.4 and rec["composition"] == "paired"
    diff = np.asarray(nib.load(tmp_path / "cxr" / "difference.nii.gz").dataobj)
    assert 0 < np.count_nonzero(diff) < 0.9 * diff.size
    # bad input: one clear error, exit code 2, nothing written
    r = subprocess.run(exe + ["counterfactual", "--bundle", "brain", "--input", str(sample), "--target", "age=120",
                              "--output-dir", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "out of range" in r.stderr and not (tmp_path / "bad").exists()


def test_png_output_bit_depth_follows_the_input(tmp_path):
    from monai_ld.pipeline import _png_bits, _write_png

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a8.png")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "a16.png")
    sample = BUNDLES / "brain_mri_counterfactual" / "sample_data" / "phantom_test_subject.nii.gz"
    assert (_png_bits(tmp_path / "a8.png"), _png_bits(tmp_path / "a16.png"), _png_bits(sample)) == (8, 16, 16)
    ramp = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    _write_png(ramp, tmp_path / "o16.png", (0.0, 1.0), 16)
    _write_png(ramp, tmp_path / "o8.png", (0.0, 1.0), 8)
    o16, o8 = np.asarray(Image.open(tmp_path / "o16.png")), np.asarray(Image.open(tmp_path / "o8.png"))
    assert o16.dtype == np.uint16 and o8.dtype == np.uint8
    assert np.abs(o16 / 65535 - ramp).max() < 1e-4 and np.abs(o8 / 255 - ramp).max() < 3e-3


def test_cxr_train_configs_run_end_to_end(tmp_path):
    """The bundle's own train configs, as a user runs them (tiny networks, 2 iterations, 12 phantoms in tmp): the
    autoencoder and the diffusion model on it, both sized by whole-network dicts (``autoencoder_config`` /
    ``unet_config``, unlike any preset: 2 latent channels), then an LD LoRA fine-tune."""
    from monai_ld.networks.model import ConditionalLDM

    cfg = BUNDLES / "chest_xray_counterfactual" / "configs"
    common = ["--data_dir", str(tmp_path / "data"), "--phantoms#n", "12", "--phantoms#size", "64", "--model_dir",
              str(tmp_path / "models"), "--max_iterations", "2", "--batch_size", "2", "--checkpoint_every", "1",
              "--device", "cpu"]
    runs = [("train_autoencoder.json", ["--autoencoder_config", "{'spatial_dims': 2, 'in_channels': 1, 'out_channels': 1, "
                                        "'latent_channels': 2, 'channels': [8, 16], 'num_res_blocks': 1, "
                                        "'attention_levels': [False, False], 'norm_num_groups': 8, "
                                        "'with_encoder_nonlocal_attn': False, 'with_decoder_nonlocal_attn': False}",
                                        "--work_dir", str(tmp_path / "runs_ae")]),
            ("train_diffusion.json", ["--unet_config", "{'spatial_dims': 2, 'in_channels': 2, 'out_channels': 2, "
                                      "'channels': [8, 16], 'num_res_blocks': 1, 'attention_levels': [False, True], "
                                      "'norm_num_groups': 8, 'num_head_channels': [0, 16], 'with_conditioning': True, "
                                      "'cross_attention_dim': 9}", "--work_dir", str(tmp_path / "runs_diff")]),
            ("finetune.json", ["--scheme", "lora", "--drift", "0.1", "--work_dir", str(tmp_path / "runs_ft")])]
    for name, extra in runs:
        # merged over the bundle's configs/common.json, as `monai-ld train` runs them
        files = [str(cfg / "common.json"), str(cfg / name)]
        r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files), *common, *extra],
                           capture_output=True, text=True, timeout=600, env=ENV)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    base = ConditionalLDM.load(tmp_path / "models" / "model.pt")
    tuned = ConditionalLDM.load(tmp_path / "models" / "model_finetuned.pt")
    assert base.autoencoder_config["latent_channels"] == 2 and base.unet_config["channels"] == [8, 16]
    assert base.unet_config["attention_levels"] == [False, True]  # Python literals, not fire's 'false' strings
    assert tuned.meta["defaults"]["mask_threshold"] == 0.4 and tuned.drift == pytest.approx(0.1)
    assert any(not torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), tuned.unet.state_dict().values()))


@pytest.mark.parametrize("name", ["brain_mri_counterfactual", "chest_xray_counterfactual"])
@pytest.mark.parametrize("job", ["train_autoencoder", "train_diffusion", "finetune"])
def test_multi_gpu_config_splits_the_batch_across_processes(name, job, monkeypatch):
    """multi_gpu_train.json merged last gives each of WORLD_SIZE processes its share of the job's batch (it used to
    redefine batch_size from itself: a circular reference MONAI rejects)."""
    from monai.bundle import ConfigParser

    from monai_ld.bundle_support import config_files

    monkeypatch.setenv("WORLD_SIZE", "2")
    parser = ConfigParser()
    parser.read_config(config_files(BUNDLES / name, f"{job}.json", "multi_gpu_train.json"))
    batch = parser.get_parsed_content("batch_size")
    assert parser.get_parsed_content("process_batch_size") == max(1, batch // 2)
    assert "batch_size=@process_batch_size" in parser["train"]
