"""Native-space counterfactuals (issue #16): input + Δ on the input's own grid, units and dtype; user edit/keep masks;
uncertainty from N samples. 3D: a tiny stand-in brain model (random weights, so the condition changes something; the
composition does not depend on training) on a 1 mm and an oblique anisotropic int16 brain made from the bundled
sample; 2D: the bundled chest X-ray model on a non-square crop of its sample radiograph."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from monai_ld.composition import MaskGeometryError, compose, intensity_scale, load_native
from monai_ld.pipeline import CounterfactualPipeline

ROOT = Path(__file__).resolve().parent.parent
BRAIN = ROOT / "bundles" / "brain_mri_counterfactual"
CXR = ROOT / "bundles" / "chest_xray_counterfactual"
SOURCE = {"age": 75.4, "sex": "F", "diagnosis": "CN"}
CXR_SOURCE = {"sex": "F", "age": 56.9, "cardiomegaly": "0", "pleural_effusion": "0", "pneumonia": "0"}


def _brain(path: Path, spacing: tuple[float, float, float], rotate_deg: float = 0.0) -> Path:
    """The bundled 2.875 mm phantom resampled to ``spacing`` (mm), int16 like a scanner's T1, optionally oblique."""
    src = nib.load(BRAIN / "sample_data" / "phantom_test_subject.nii.gz")
    zoom = [2.875 / s for s in spacing]
    a = ndimage.zoom(src.get_fdata().astype(np.float32), zoom, order=1)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = src.affine[:3, 3]
    if rotate_deg:
        c, s = np.cos(np.deg2rad(rotate_deg)), np.sin(np.deg2rad(rotate_deg))
        aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ aff[:3, :3]
    nib.save(nib.Nifti1Image(np.round(a * 1000).astype(np.int16), aff), path)
    return path


@pytest.fixture(scope="module")
def brain_pipe():
    """The brain bundle's chain and attributes on 32^3 x 6 mm with tiny networks (a few seconds per edit)."""
    from monai_ld import ConditionalLDM
    from monai_ld.data.phantoms import brain_attribute_encoder
    from monai_ld.networks import autoencoder_config, unet_config

    enc = brain_attribute_encoder()
    torch.manual_seed(0)
    m = ConditionalLDM(autoencoder_config(3, "tiny"), unet_config(3, 3, enc.dim, "tiny"), enc,
                       meta={"preprocessing": {"chain": "brain_mri", "spatial_size": [32, 32, 32], "pixdim": [6, 6, 6]},
                             "defaults": {"composition": "paired", "num_inference_steps": 4}})
    with torch.no_grad():  # MONAI zero-initialises the UNet's output: perturb it so target and source differ
        for q in m.unet.parameters():
            q.add_(torch.randn_like(q) * 0.05)
    return CounterfactualPipeline(m)


@pytest.fixture(scope="module")
def one_mm(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    img = _brain(root / "t1_1mm.nii.gz", (1.0, 1.0, 1.0))
    shape, aff = nib.load(img).shape, nib.load(img).affine
    edit = np.zeros(shape, np.uint8)
    edit[40:140, 50:150, 40:140] = 1
    keep = np.zeros(shape, np.uint8)
    keep[:, :, 100:] = 1
    nib.save(nib.Nifti1Image(edit, aff), root / "edit.nii.gz")
    nib.save(nib.Nifti1Image(keep, aff), root / "keep.nii.gz")
    return root


def test_1mm_brain_masks_and_uncertainty(brain_pipe, one_mm, tmp_path):
    """1 mm int16 input, automatic mask + --edit-mask + --keep-mask, --samples 4: every voxel outside the edit region is
    the input's, the output has the input's shape, affine and dtype, uncertainty is finite and 0 outside the region."""
    img = one_mm / "t1_1mm.nii.gz"
    out = brain_pipe.run_to_dir(img, tmp_path / "o", {"diagnosis": "AD"}, SOURCE, edit_mask=one_mm / "edit.nii.gz",
                                keep_mask=one_mm / "keep.nii.gz", mask_threshold=0.5, samples=4)
    src, cf = nib.load(img), nib.load(out["counterfactual"])
    assert cf.shape == src.shape and cf.get_data_dtype() == np.int16
    np.testing.assert_array_equal(cf.affine, src.affine)
    x, y = np.asarray(src.dataobj), np.asarray(cf.dataobj)
    edit = np.asarray(nib.load(one_mm / "edit.nii.gz").dataobj) > 0
    keep = np.asarray(nib.load(one_mm / "keep.nii.gz").dataobj) > 0
    changed = y != x
    assert np.count_nonzero(changed & ~edit) == 0 and np.count_nonzero(changed & keep) == 0
    assert np.count_nonzero(changed) > 100  # the edit did something inside the region
    diff = nib.load(out["difference"]).get_fdata()
    np.testing.assert_array_equal(diff, y.astype(np.float64) - x)  # the difference is in the input's units, exact
    unc = nib.load(out["uncertainty"]).get_fdata()
    assert unc.shape == src.shape and np.isfinite(unc).all() and unc.max() > 0
    rec = json.loads(Path(out["record"]).read_text())
    region = rec["region"]["region_voxels"]
    assert 0 < region <= np.count_nonzero(edit & ~keep)  # the automatic mask can only narrow the user's region
    assert np.count_nonzero(unc[~edit | keep]) == 0 and np.count_nonzero(unc) <= region
    assert rec["output_space"] == "native" and rec["samples"] == 4 and rec["seeds"] == [0, 1, 2, 3]
    assert rec["abduction"] == "noising"  # DDIM inversion is deterministic: samples need a stochastic abduction
    assert rec["changed_voxels"] == np.count_nonzero(changed)
    assert Image.open(out["figure"]).size[0] > 300  # four panels


def test_oblique_anisotropic_native_vs_model(brain_pipe, tmp_path):
    """Default (native) on an oblique 1.2 x 1.2 x 2 mm scan: the input's geometry and dtype; an identity edit
    (strength 0) returns the input bit for bit, while the old whole-volume mode resamples every voxel."""
    img = _brain(tmp_path / "oblique.nii.gz", (1.2, 1.2, 2.0), rotate_deg=15)
    src = nib.load(img)
    x = np.asarray(src.dataobj)
    nat = brain_pipe(img, {"diagnosis": "AD"}, SOURCE)
    y = nat["counterfactual"][0].numpy()
    assert y.shape == x.shape and y.dtype == np.int16 and nat["counterfactual"].meta["stored_dtype"] == "int16"
    np.testing.assert_allclose(nat["counterfactual"].affine.numpy(), src.affine, atol=1e-5)
    assert nat["record"]["changed_voxels"] == np.count_nonzero(y != x) > 0
    same = brain_pipe(img, {"diagnosis": "AD"}, SOURCE, strength=0.0)
    np.testing.assert_array_equal(same["counterfactual"][0].numpy(), x)
    model = brain_pipe(img, {"diagnosis": "AD"}, SOURCE, strength=0.0, output_space="model")
    m = model["counterfactual"][0].numpy() * intensity_scale(model["reference"])  # model scale -> input units
    assert model["record"]["output_space"] == "model" and m.shape == x.shape
    assert np.count_nonzero(np.abs(m - x) > 1) > 0.3 * np.count_nonzero(x)  # the model grid's blur, everywhere


def test_cxr_native_size_png_and_masks(tmp_path):
    """A non-square 16-bit radiograph: counterfactual.png at its size and bit depth, pixels outside the edit mask and
    inside the keep mask bit-identical (PNG and NIfTI)."""
    a = np.asarray(Image.open(CXR / "sample_data" / "phantom_test_radiograph.png"))[5:125, 20:110]  # 120 x 90
    Image.fromarray(a).save(tmp_path / "crop.png")
    edit = np.zeros(a.shape, np.uint8)
    edit[30:110, 5:70] = 255
    keep = np.zeros(a.shape, np.uint8)
    keep[60:70, :] = 1
    Image.fromarray(edit).save(tmp_path / "edit.png")
    Image.fromarray(keep).save(tmp_path / "keep.png")
    pipe = CounterfactualPipeline.from_checkpoint(CXR / "models" / "model.pt")
    out = pipe.run_to_dir(tmp_path / "crop.png", tmp_path / "o", {"cardiomegaly": "1"}, CXR_SOURCE, num_inference_steps=6,
                          mask_threshold=0.2, edit_mask=tmp_path / "edit.png", keep_mask=tmp_path / "keep.png")
    y = np.asarray(Image.open(out["counterfactual_png"]))
    assert y.shape == a.shape and y.dtype == np.uint16
    changed = y != a
    assert np.count_nonzero(changed) > 0 and np.count_nonzero(changed & ((edit == 0) | (keep > 0))) == 0
    n = nib.load(out["counterfactual"])
    assert n.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asarray(n.dataobj).T, y)


def test_mask_on_another_grid_is_one_error_and_nothing_written(brain_pipe, one_mm, tmp_path, capsys):
    from monai_ld.cli import main

    src = nib.load(one_mm / "t1_1mm.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((92, 92, 92), np.uint8), src.affine), tmp_path / "half.nii.gz")
    with pytest.raises(MaskGeometryError, match=r"shape \(92, 92, 92\).*shape \(184, 184, 184\)"):
        brain_pipe.run_to_dir(one_mm / "t1_1mm.nii.gz", tmp_path / "o", {"diagnosis": "AD"}, SOURCE,
                              keep_mask=tmp_path / "half.nii.gz")
    shifted = src.affine.copy()
    shifted[0, 3] += 5
    nib.save(nib.Nifti1Image(np.ones(src.shape, np.uint8), shifted), tmp_path / "moved.nii.gz")
    rc = main(["counterfactual", "--bundle", "brain", "--input", str(one_mm / "t1_1mm.nii.gz"), "--target", "diagnosis=AD",
               "--source", "age=75", "--source", "sex=F", "--source", "diagnosis=CN", "--edit-mask",
               str(tmp_path / "moved.nii.gz"), "--output-dir", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    origin = round(float(src.affine[0, 3]), 3)
    assert rc == 2 and "edit mask" in err and f"{origin + 5}" in err and f"{origin}" in err  # both geometries named
    assert not (tmp_path / "o").exists() and not (tmp_path / "cli").exists()
    with pytest.raises(ValueError, match="native output space"):
        brain_pipe(one_mm / "t1_1mm.nii.gz", {"diagnosis": "AD"}, SOURCE, output_space="model",
                   edit_mask=one_mm / "edit.nii.gz")
    with pytest.raises(ValueError, match="stochastic abduction"):
        brain_pipe.resolve({"diagnosis": "AD"}, SOURCE, samples=2, abduction="inversion")
    with pytest.raises(ValueError, match="output_space must be one of native, model"):
        brain_pipe.resolve({"diagnosis": "AD"}, SOURCE, output_space="input")


def test_compose_casts_to_the_stored_dtype(tmp_path):
    """Integers rounded and clipped to the file's own range (uint16 PNG read as int32), float kept, region exact."""
    Image.fromarray(np.array([[0, 100, 65535, 7]], np.uint16)).save(tmp_path / "a.png")
    native = load_native(tmp_path / "a.png")
    assert native.meta["stored_dtype"] == "uint16"
    delta = torch.tensor([[[-5.0], [0.4], [9.0], [2.6]]])
    y = compose(native, delta)
    assert y.dtype == native.dtype and y.flatten().tolist() == [0, 100, 65535, 10]
    region = torch.tensor([[[True], [True], [True], [False]]])
    assert compose(native, delta, region).flatten().tolist() == [0, 100, 65535, 7]
    f = load_native(tmp_path / "a.png")
    f = f.float() + 0.25
    assert compose(f, torch.full_like(f, 0.5)).dtype == torch.float32


def test_intensity_scale_and_recorded_range():
    """The chain records the percentile range MONAI's scaling used; MONOCHROME1 inversion flips Δ's sign."""
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRangePercentiles

    from monai_ld.transforms import RecordedPercentileScale

    img = MetaTensor(torch.arange(1000, dtype=torch.float32).reshape(1, 10, 10, 10))
    out = RecordedPercentileScale(0.5, 99.5, 0.0, 1.0, clip=True)(img)
    ref = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(img.as_tensor())
    np.testing.assert_array_equal(out.as_tensor().numpy(), np.asarray(ref))
    a_min, a_max = out.meta["intensity_range"][:2]
    assert intensity_scale(out) == pytest.approx(a_max - a_min)
    out.meta["inverted_monochrome1"] = True
    assert intensity_scale(out) == pytest.approx(a_min - a_max)


def test_per_sample_generators_draw_like_single_seeds():
    from monai_ld.sampling import randn

    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    batch = randn((2, 2, 5), gens, torch.float32, "cpu")
    for i, s in enumerate((3, 4)):
        torch.testing.assert_close(batch[i : i + 1], torch.randn((1, 2, 5), generator=torch.Generator().manual_seed(s)))


def test_cohort_mode_resumes_and_reports_the_bad_row(tmp_path, capsys):
    """--input-list: 8 radiographs (one corrupt) in batches of 3 -> 7 outputs, one clear error, exit 1; the re-run
    skips the 7; a batched row equals the same input run alone."""
    import csv

    from monai_ld.cli import main

    a = np.asarray(Image.open(CXR / "sample_data" / "phantom_test_radiograph.png"))
    rows = []
    for i in range(7):
        Image.fromarray(a[i : 100 + i, 3 * i : 90 + 3 * i]).save(tmp_path / f"cxr{i}.png")
        rows.append({"path": f"cxr{i}.png", **CXR_SOURCE})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows.insert(3, {"path": str(tmp_path / "broken.png"), **CXR_SOURCE})
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cmd = ["counterfactual", "--bundle", "cxr", "--input-list", str(tmp_path / "list.csv"), "--target", "cardiomegaly=1",
           "--steps", "2", "--batch-size", "3", "--output-dir", str(tmp_path / "out")]
    assert main(cmd) == 1
    err = capsys.readouterr().err
    assert err.count(": error: ") == 1 and "row 4" in err and "broken.png" in err and "could not read image" in err
    summary = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [r["status"] for r in summary].count("done") == 7 and summary[3]["status"] == "failed"
    for i in range(7):
        y = np.asarray(Image.open(tmp_path / "out" / f"cxr{i}" / "counterfactual.png"))
        assert y.shape == (100, 90) and y.dtype == np.uint16
    assert not (tmp_path / "out" / "broken").exists()
    alone = CounterfactualPipeline.from_checkpoint(CXR / "models" / "model.pt").run_to_dir(
        tmp_path / "cxr5.png", tmp_path / "alone", {"cardiomegaly": "1"}, CXR_SOURCE, num_inference_steps=2)
    batched = np.asarray(Image.open(tmp_path / "out" / "cxr5" / "counterfactual.png")).astype(int)
    assert np.abs(np.asarray(Image.open(alone["counterfactual_png"])).astype(int) - batched).max() <= 2
    assert main(cmd) == 1  # the bad row still fails; the finished ones are not recomputed
    summary = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [r["status"] for r in summary].count("skipped (done)") == 7


def test_source_auto_estimates_what_is_not_given(tmp_path, capsys):
    """--source auto on a radiograph: the bundle's attribute predictor fills the source, given values win, and the
    estimate with its confidence is recorded."""
    from monai_ld.cli import main

    a = np.asarray(Image.open(CXR / "sample_data" / "phantom_test_radiograph.png"))[5:125, 20:110]
    Image.fromarray(a).save(tmp_path / "crop.png")
    rc = main(["counterfactual", "--bundle", "cxr", "--input", str(tmp_path / "crop.png"), "--source", "auto",
               "--source", "sex=M", "--target", "cardiomegaly=1", "--steps", "2", "--output-dir", str(tmp_path / "o")])
    assert rc == 0 and "estimated by the attribute predictor" in capsys.readouterr().out
    rec = json.loads((tmp_path / "o" / "record.json").read_text())
    est = rec["source_estimate"]
    assert rec["source"]["sex"] == "M" and est["given"] == ["sex"] and est["values"]["sex"] == "F"  # given wins
    assert set(rec["source"]) == set(est["values"]) and rec["source"]["age"] == est["values"]["age"]
    assert est["confidence"]["age"] is None and 0.5 <= est["confidence"]["cardiomegaly"] <= 1.0
    assert rec["target"]["cardiomegaly"] == "1" and rec["target"]["pneumonia"] == rec["source"]["pneumonia"]
