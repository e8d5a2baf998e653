"""Preprocessing chains on real scans: load, validate, preprocess, restore to the input space, save."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import torchio as tio
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, TorchIOd

from monai_ld.conditioning import AttributeEncoder, CategoricalAttribute, ConditionError, ContinuousAttribute
from monai_ld.transforms import (
    EncodeAttributesd,
    ExtractSlice,
    ImageLoadError,
    ImageValidationError,
    LoadMedicalImage,
    N4BiasFieldCorrection,
    TorchIOSubjectd,
    ValidateImage,
    brain_mri_transforms,
    chest_xray_transforms,
    dict_to_subject,
    restore_to_input_space,
    save_like_input,
    subject_to_dict,
)

warnings.filterwarnings("ignore", category=UserWarning)

DATA = Path(__file__).parent / "data"
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # real T1, 33x41x25 @ 2 mm, LAS
DICOM_SERIES = DATA / "dicom_brain_series"
CXR_DCM = DATA / "chest_cr_rg1.dcm"
CXR_PNG = DATA / "chest_cr_rg1.png"


def _head_mask(arr: np.ndarray) -> np.ndarray:
    return arr > 0.2 * np.percentile(arr, 99)


def test_shipped_files_present():
    assert ANATOMICAL.is_file(), "nibabel wheel no longer ships tests/data/anatomical.nii"
    assert len(list(DICOM_SERIES.glob("brain_*.dcm"))) == 20
    assert CXR_DCM.is_file() and CXR_PNG.is_file()


def test_brain_chain_roundtrip_restores_geometry(tmp_path):
    tr = brain_mri_transforms(spatial_size=(40, 48, 32), pixdim=(2.0, 2.0, 2.0))
    d = tr({"image": str(ANATOMICAL)})
    img = d["image"]
    assert img.shape == (1, 40, 48, 32) and img.dtype == torch.float32
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    assert nib.aff2axcodes(img.affine.numpy()) == ("R", "A", "S")

    # a model output: the preprocessed image itself, changed so a mix-up of axes would show
    out = img.clone() * 2.0
    restored = restore_to_input_space(out, d, tr)
    ref = nib.load(ANATOMICAL)
    assert tuple(restored.shape[1:]) == ref.shape
    np.testing.assert_allclose(restored.affine.numpy(), ref.affine, atol=1e-4)
    orig = ref.get_fdata()
    mask = _head_mask(orig)
    corr = np.corrcoef(restored[0].numpy()[mask], orig[mask])[0, 1]
    assert corr > 0.9, corr  # same anatomy at the same voxels (only intensity scaling differs)

    saved = save_like_input(restored, tmp_path / "cf.nii.gz")
    back = nib.load(saved)
    assert back.shape == ref.shape
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-4)
    assert nib.aff2axcodes(back.affine) == nib.aff2axcodes(ref.affine) == ("L", "A", "S")
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_non_ras_input_comes_back_in_its_own_orientation(tmp_path):
    ref = nib.load(ANATOMICAL)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(ref.affine), nib.orientations.axcodes2ornt(("P", "S", "R")))
    psr = ref.as_reoriented(ornt)
    src = tmp_path / "anat_psr.nii.gz"
    nib.save(psr, src)
    assert nib.aff2axcodes(nib.load(src).affine) == ("P", "S", "R")

    tr = brain_mri_transforms(spatial_size=(40, 48, 32), pixdim=(2.0, 2.0, 2.0))
    d = tr({"image": str(src)})
    assert nib.aff2axcodes(d["image"].affine.numpy()) == ("R", "A", "S")
    restored = restore_to_input_space(d["image"], d, tr)
    assert tuple(restored.shape[1:]) == psr.shape
    np.testing.assert_allclose(restored.affine.numpy(), psr.affine, atol=1e-4)
    orig = psr.get_fdata()
    mask = _head_mask(orig)
    assert np.corrcoef(restored[0].numpy()[mask], orig[mask])[0, 1] > 0.9

    out = save_like_input(restored, tmp_path / "out.nii.gz")
    assert nib.aff2axcodes(nib.load(out).affine) == ("P", "S", "R")
    with pytest.raises(ValueError, match="overwrite the input"):
        save_like_input(restored, src, overwrite=True)
    with pytest.raises(ValueError, match="exists"):
        save_like_input(restored, out)
    assert nib.load(src).shape == psr.shape  # input untouched


def test_slice_extraction_and_back():
    tr = brain_mri_transforms(spatial_size=(40, 48, 32), pixdim=(2.0, 2.0, 2.0), slice_axis=2)
    d = tr({"image": str(ANATOMICAL)})
    img = d["image"]
    assert img.shape == (1, 40, 48)
    vol = brain_mri_transforms(spatial_size=(40, 48, 32), pixdim=(2.0, 2.0, 2.0))({"image": str(ANATOMICAL)})["image"]
    torch.testing.assert_close(img.as_tensor(), vol[..., 16].as_tensor())
    # the slice affine maps pixel (i, j) to the world position of voxel (i, j, 16)
    np.testing.assert_allclose((img.affine @ torch.tensor([3.0, 5.0, 0.0, 1.0], dtype=torch.float64)).numpy(),
                               (vol.affine @ torch.tensor([3.0, 5.0, 16.0, 1.0], dtype=torch.float64)).numpy())
    restored = restore_to_input_space(img, d, tr)
    ref = nib.load(ANATOMICAL)
    assert tuple(restored.shape[1:]) == ref.shape
    np.testing.assert_allclose(restored.affine.numpy(), ref.affine, atol=1e-4)
    # only a slab around the extracted axial slice carries signal
    nz = np.nonzero(restored[0].numpy().reshape(-1, ref.shape[2]).any(axis=0))[0]
    assert 0 < len(nz) <= 3, nz
    with pytest.raises(ValueError, match="outside"):
        ExtractSlice(2, index=99)(vol)


def test_dicom_series_loads_as_volume():
    ds = [pydicom.dcmread(f) for f in sorted(DICOM_SERIES.glob("*.dcm"))]
    img = LoadMedicalImage(ensure_channel_first=True)(str(DICOM_SERIES))
    assert img.shape == (1, 256, 256, 20)
    sp = np.sqrt((img.affine[:3, :3].numpy() ** 2).sum(0))
    np.testing.assert_allclose(sp[:2], [0.859375, 0.859375], atol=1e-4)
    # slice spacing is the distance between consecutive ImagePositionPatient, ~7 mm here
    pos = np.array([[float(x) for x in s.ImagePositionPatient] for s in ds])
    assert abs(sp[2] - np.median(np.linalg.norm(np.diff(pos, axis=0), axis=1))) < 0.2

    tr = brain_mri_transforms(spatial_size=(64, 64, 32), pixdim=(3.0, 3.0, 3.0))
    d = tr({"image": str(DICOM_SERIES)})
    assert d["image"].shape == (1, 64, 64, 32)
    restored = restore_to_input_space(d["image"], d, tr)
    assert tuple(restored.shape) == (1, 256, 256, 20)
    np.testing.assert_allclose(restored.affine.numpy(), img.affine.numpy(), atol=1e-3)


def test_chest_xray_chain_dicom_monochrome1_and_png_agree():
    tr = chest_xray_transforms(size=128)
    dcm = tr({"image": str(CXR_DCM)})["image"]
    png = tr({"image": str(CXR_PNG)})["image"]
    assert dcm.shape == png.shape == (1, 128, 128)
    for x in (dcm, png):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # 488 x 460 -> longest side 128, aspect kept -> 121 (or 120) columns, padded with zeros to 128
    assert (dcm[0, :3] == 0).all() and (dcm[0, -3:] == 0).all() and (dcm[0, 10] > 0).any()
    # the DICOM is MONOCHROME1, the PNG is its display (MONOCHROME2) copy: agreeing means the inversion happened
    assert pydicom.dcmread(CXR_DCM).PhotometricInterpretation == "MONOCHROME1"
    corr = np.corrcoef(dcm.numpy().ravel(), png.numpy().ravel())[0, 1]
    assert corr > 0.95, corr
    # the mediastinum (central columns) is brighter than the lungs on either side, as on any PA film
    centre, side = float(dcm[0, 58:70, 30:80].mean()), float(dcm[0, 25:40, 30:80].mean())
    assert centre > side


def test_chest_xray_batches_with_condition():
    enc = AttributeEncoder([CategoricalAttribute("sex", ("F", "M")), ContinuousAttribute("age", 0, 100, "years")])
    tr = chest_xray_transforms(size=64, encoder=enc)
    items = [{"image": str(CXR_PNG), "sex": "F", "age": 55}, {"image": str(CXR_DCM), "sex": "F", "age": 55.0}]
    batch = next(iter(DataLoader(Dataset(items, tr), batch_size=2)))
    assert batch["image"].shape == (2, 1, 64, 64)
    assert batch["condition"].shape == (2, 1, enc.dim)
    torch.testing.assert_close(batch["condition"], enc.context([{"sex": "F", "age": 55}] * 2))


def test_encode_attributesd_errors_name_the_sample():
    enc = AttributeEncoder([ContinuousAttribute("age", 40, 95, "years"), CategoricalAttribute("sex", ("F", "M"))])
    t = EncodeAttributesd(keys=["AGE", "PTGENDER"], encoder=enc, attribute_names=["age", "sex"])
    out = t({"AGE": 70, "PTGENDER": "M", "subject_id": "s1"})
    assert out["condition"].shape == (1, 3)
    with pytest.raises(ConditionError, match=r"subject_id='s1'.*'age'.*out of range.*\[40, 95\]"):
        t({"AGE": 120, "PTGENDER": "M", "subject_id": "s1"})
    with pytest.raises(ConditionError, match="unknown attribute"):
        EncodeAttributesd(keys=["age", "bmi"], encoder=enc)
    with pytest.raises(ConditionError, match=r"column 'PTGENDER'.*missing"):
        t({"AGE": 70})


def test_n4_reduces_a_known_bias_field():
    ref = nib.load(ANATOMICAL)
    arr = ref.get_fdata().astype(np.float32)
    x = np.linspace(-1, 1, arr.shape[0])[:, None, None]
    bias = np.exp(0.4 * x) * np.ones_like(arr)  # smooth multiplicative left-right field
    img = MetaTensor(torch.from_numpy((arr * bias)[None]), affine=torch.as_tensor(ref.affine))
    out = N4BiasFieldCorrection(shrink_factor=1, num_iterations=(30, 30))(img)
    assert out.shape == img.shape and isinstance(out, MetaTensor)
    np.testing.assert_allclose(out.affine.numpy(), ref.affine)
    mask = _head_mask(arr)
    err_before = np.std(np.log((arr * bias)[mask] + 1) - np.log(arr[mask] + 1))
    err_after = np.std(np.log(out[0].numpy()[mask] + 1) - np.log(arr[mask] + 1))
    assert err_after < 0.8 * err_before, (err_before, err_after)


# ---- bad inputs: one clear error ------------------------------------------------------------------------------------


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    good = ANATOMICAL.read_bytes()
    for name, payload in [("trunc.nii", good[:600]), ("garbage.nii.gz", b"not a gzip stream"),
                          ("broken.dcm", b"\x00" * 128 + b"DICM" + b"\x01\x02")]:
        p = tmp_path / name
        p.write_bytes(payload)
        with pytest.raises(ImageLoadError, match=name.replace(".", r"\.")):
            brain_mri_transforms()({"image": str(p)})
    with pytest.raises(ImageLoadError, match="does not exist"):
        LoadMedicalImage()(str(tmp_path / "nope.nii.gz"))
    (tmp_path / "scan.xyz").write_bytes(b"abc")
    with pytest.raises(ImageLoadError, match="unsupported format.*Accepted"):
        LoadMedicalImage()(str(tmp_path / "scan.xyz"))


def _save(tmp_path, name, arr, affine=np.diag([2.0, 2.0, 2.0, 1.0])):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(arr, affine), p)
    return str(p)


def test_wrong_dimensionality_rejected(tmp_path):
    arr = nib.load(ANATOMICAL).get_fdata().astype(np.float32)
    four_d = _save(tmp_path, "fmri.nii.gz", np.stack([arr, arr, arr], -1))
    with pytest.raises(ImageValidationError, match=r"fmri\.nii\.gz.*3 channels/volumes.*single 3D volume"):
        brain_mri_transforms()({"image": four_d})
    two_d = _save(tmp_path, "slice.nii.gz", arr[:, :, 12])
    with pytest.raises(ImageValidationError, match=r"2 spatial dimension.*single 3D volume"):
        brain_mri_transforms()({"image": two_d})
    with pytest.raises(ImageValidationError, match="3 spatial dimension.*single 2D image"):
        chest_xray_transforms()({"image": str(ANATOMICAL)})


def test_nan_and_constant_images_rejected(tmp_path):
    arr = nib.load(ANATOMICAL).get_fdata().astype(np.float32)
    bad = arr.copy()
    bad[10, 10, 10] = np.nan
    bad[11, 10, 10] = np.inf
    with pytest.raises(ImageValidationError, match=r"2 non-finite voxel\(s\) \(1 NaN, 1 Inf\)"):
        brain_mri_transforms()({"image": _save(tmp_path, "nan.nii.gz", bad)})
    with pytest.raises(ImageValidationError, match="constant.*= 0"):
        brain_mri_transforms()({"image": _save(tmp_path, "zeros.nii.gz", np.zeros_like(arr))})
    with pytest.raises(ImageValidationError, match="constant"):
        ValidateImage(spatial_dims=2)(torch.full((1, 8, 8), 3.0))


# ---- torchio interop ------------------------------------------------------------------------------------------------


def test_torchio_subject_roundtrip_and_wrappers():
    subject = tio.Subject(t1=tio.ScalarImage(ANATOMICAL), age=70)
    d = subject_to_dict(subject)
    assert isinstance(d["t1"], MetaTensor) and d["age"] == 70
    assert d["t1"].shape == (1, 33, 41, 25)
    np.testing.assert_allclose(d["t1"].affine.numpy(), nib.load(ANATOMICAL).affine)
    back = dict_to_subject(d, image_keys=["t1"])
    np.testing.assert_allclose(back["t1"].affine, subject["t1"].affine)
    torch.testing.assert_close(back["t1"].data, subject["t1"].data)

    # MONAI's TorchIOd wrapper runs a torchio intensity transform inside a chain
    chain = Compose([TorchIOd(keys=["t1"], name="RescaleIntensity", out_min_max=(0, 1))])
    r = chain({"t1": d["t1"]})["t1"]
    assert float(r.min()) == 0.0 and float(r.max()) == 1.0
    # affine-aware torchio spatial transform through TorchIOSubjectd: LAS -> RAS canonical
    can = TorchIOSubjectd(keys=["t1"], transform=tio.ToCanonical())(d)["t1"]
    assert nib.aff2axcodes(can.affine.numpy()) == ("R", "A", "S")
    torch.testing.assert_close(can[0].flip(0), d["t1"][0].float().as_tensor())


def test_nrrd_input_in_lps_space(tmp_path):
    import nrrd

    ref = nib.load(ANATOMICAL)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ref.affine  # NRRD stores the LPS world affine
    src = tmp_path / "anat.nrrd"
    nrrd.write(str(src), ref.get_fdata().astype(np.float32),
               {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]})
    tr = brain_mri_transforms(spatial_size=(40, 48, 32), pixdim=(2.0, 2.0, 2.0))
    d = tr({"image": str(src)})
    assert d["image"].shape == (1, 40, 48, 32)
    restored = restore_to_input_space(d["image"], d, tr)
    assert tuple(restored.shape[1:]) == ref.shape
    np.testing.assert_allclose(restored.affine.numpy(), ref.affine, atol=1e-4)  # RAS, as the NIfTI of the same scan


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import monai_ld.transforms.io as io_mod

    img = MetaTensor(torch.rand(1, 4, 4, 4), affine=torch.eye(4))
    previous = save_like_input(img, tmp_path / "x.nii.gz")
    before = previous.read_bytes()

    def interrupted_save(nii, path):  # a disk that fills up half-way through the write
        Path(path).write_bytes(b"\x1f\x8b partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(io_mod.nib, "save", interrupted_save)
    with pytest.raises(OSError, match="No space"):
        save_like_input(img * 2, tmp_path / "x.nii.gz", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]  # no temporary left
    assert previous.read_bytes() == before  # the earlier output is intact
    with pytest.raises(ValueError, match="NIfTI"):
        save_like_input(img, tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not match"):
        restore_to_input_space(torch.zeros(1, 5, 5, 5), {"image": brain_mri_transforms(spatial_size=(8, 8, 8))(
            {"image": str(ANATOMICAL)})["image"]}, brain_mri_transforms(spatial_size=(8, 8, 8)))
