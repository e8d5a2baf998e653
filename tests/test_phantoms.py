"""Phantom generators: reproducibility, mechanism direction/size/locality, exact counterfactuals, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from monai_ld.cli import main as cli_main
from monai_ld.data.phantoms import BRAIN_LABELS, CXR_LABELS, BrainPhantom, ChestXrayPhantom, write_phantom_dataset

BASE_BRAIN = {"age": 50, "sex": "F", "diagnosis": "CN"}
BASE_CXR = {"sex": "M", "age": 50, "cardiomegaly": 0, "pleural_effusion": 0, "pneumonia": 0}


@pytest.fixture(scope="module")
def brain():
    return BrainPhantom()


@pytest.fixture(scope="module")
def cxr():
    return ChestXrayPhantom()


@pytest.fixture(scope="module")
def brain_renders(brain):
    ident = brain.sample_identity(11)
    attrs = {
        "base": BASE_BRAIN,
        "old": {**BASE_BRAIN, "age": 90},
        "ad": {**BASE_BRAIN, "diagnosis": "AD"},
        "mci": {**BASE_BRAIN, "diagnosis": "MCI"},
        "male": {**BASE_BRAIN, "sex": "M"},
    }
    return {k: brain.render(ident, a, 64) for k, a in attrs.items()}


def test_brain_same_seed_identical(brain):
    a = brain.render(brain.sample_identity(3), BASE_BRAIN, 48)
    b = BrainPhantom().render(brain.sample_identity(3), BASE_BRAIN, 48)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    c = brain.render(brain.sample_identity(4), BASE_BRAIN, 48)
    assert not np.allclose(a.image, c.image)


def test_brain_output_contract(brain_renders):
    r = brain_renders["base"]
    assert r.image.shape == (1, 64, 64, 64) and r.image.dtype == np.float32
    assert 0.0 <= r.image.min() and r.image.max() <= 1.0 and r.image.max() > 0.5
    assert r.labels.shape == (64, 64, 64) and r.labels.dtype == np.uint8
    present = set(np.unique(r.labels))
    assert set(BRAIN_LABELS.values()) <= present  # every structure survives at 64^3
    # label map matches intensities: WM brighter than GM brighter than ventricles
    img = r.image[0]
    wm, gm, v = (img[r.labels == BRAIN_LABELS[k]].mean() for k in ("wm", "gm", "ventricle_left"))
    assert wm > gm > v
    assert np.allclose(np.diag(r.affine)[:3], 184.0 / 64)


def test_identity_is_deterministic_and_shared(brain):
    i1, i2 = brain.sample_identity(42), brain.sample_identity(42)
    assert i1 == i2
    assert brain.sample_identity(43) != i1


def test_age_enlarges_ventricles_and_thins_cortex(brain_renders):
    b, o = brain_renders["base"].measurements, brain_renders["old"].measurements
    assert o["ventricle_ml"] > 1.2 * b["ventricle_ml"]
    assert o["gm_ml"] < b["gm_ml"]
    assert o["csf_ml"] > b["csf_ml"]


def test_diagnosis_shrinks_hippocampus_dose_dependent(brain_renders):
    cn, mci, ad = (brain_renders[k].measurements for k in ("base", "mci", "ad"))
    assert ad["hippocampus_ml"] < 0.9 * cn["hippocampus_ml"]
    assert ad["hippocampus_ml"] < mci["hippocampus_ml"] < cn["hippocampus_ml"]
    assert ad["ventricle_ml"] > mci["ventricle_ml"] > cn["ventricle_ml"]
    # diagnosis leaves cortex volume (almost) unchanged
    assert abs(ad["gm_ml"] - cn["gm_ml"]) < 0.02 * cn["gm_ml"]


def test_sex_changes_head_size(brain_renders):
    f, m = brain_renders["base"].measurements, brain_renders["male"].measurements
    assert m["brain_ml"] > 1.1 * f["brain_ml"]


def test_diagnosis_counterfactual_is_local(brain_renders):
    base, ad = brain_renders["base"], brain_renders["ad"]
    sp = 184.0 / 64
    near = np.isin(base.labels, [4, 5, 6, 7, 8, 9])
    dist = ndi.distance_transform_edt(~near) * sp
    diff = np.abs(ad.image - base.image)[0]
    assert diff[dist > 20].max() == 0.0  # bit-identical far from ventricles / medial temporal lobe
    assert diff[dist < 5].max() > 0.2  # and clearly changed near them
    # identity noise / bias / warp are shared: the background and far tissue are identical, labels too
    assert np.array_equal(ad.labels[dist > 20], base.labels[dist > 20])


def test_age_counterfactual_leaves_deep_white_matter(brain_renders):
    base, old = brain_renders["base"], brain_renders["old"]
    sp = 184.0 / 64
    affected = np.isin(base.labels, [1, 4, 5, 6, 7, 8, 9]) | (base.labels == 0)
    dist = ndi.distance_transform_edt(~affected) * sp
    diff = np.abs(old.image - base.image)[0]
    assert (dist > 16).sum() > 50
    assert diff[dist > 16].max() < 0.01  # near-unchanged (tails of the smooth fields) ...
    assert (diff[dist > 16] == 0).mean() > 0.9  # ... and mostly bit-identical


def test_brain_render_rejects_bad_input(brain):
    ident = brain.sample_identity(1)
    with pytest.raises(ValueError):
        brain.render(ident, {**BASE_BRAIN, "age": 120}, 32)
    with pytest.raises(ValueError):
        brain.render(ident, {**BASE_BRAIN, "diagnosis": "XX"}, 32)
    with pytest.raises(ValueError):
        brain.render(ident, BASE_BRAIN, 8)


# -- chest X-ray ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cxr_renders(cxr):
    ident = cxr.sample_identity(5)
    return ident, {f: cxr.render(ident, {**BASE_CXR, **({f: 1} if f != "base" else {})}, 128)
                   for f in ("base", "cardiomegaly", "pleural_effusion", "pneumonia")}


def test_cxr_reproducible_and_contract(cxr):
    a = cxr.render(cxr.sample_identity(2), BASE_CXR, 128)
    b = ChestXrayPhantom().render(cxr.sample_identity(2), BASE_CXR, 128)
    assert np.array_equal(a.image, b.image)
    assert a.image.shape == (1, 128, 128) and a.image.dtype == np.float32
    assert 0 <= a.image.min() and a.image.max() <= 1
    assert {CXR_LABELS[k] for k in ("lung_right", "lung_left", "heart")} <= set(np.unique(a.labels))
    # anatomy in the radiograph convention: lungs dark, heart brighter, patient's heart on the image right
    img, lab = a.image[0], a.labels
    assert img[lab == CXR_LABELS["heart"]].mean() > img[np.isin(lab, [2, 3])].mean() + 0.15
    assert np.argwhere(lab == CXR_LABELS["heart"])[:, 1].mean() > 64
    assert 0.35 < a.measurements["ctr"] < 0.5


def test_cardiomegaly_raises_ctr(cxr_renders):
    _, r = cxr_renders
    assert r["cardiomegaly"].measurements["ctr"] > r["base"].measurements["ctr"] + 0.05
    assert r["cardiomegaly"].measurements["ctr"] > 0.5


def test_effusion_changes_only_lower_lung(cxr_renders):
    _, r = cxr_renders
    base, eff = r["base"], r["pleural_effusion"]
    assert eff.measurements["effusion_area_mm2"] > 1000 and base.measurements["effusion_area_mm2"] == 0
    assert eff.measurements["lung_area_mm2"] < base.measurements["lung_area_mm2"]
    lung_rows = np.flatnonzero(np.isin(base.labels, [2, 3]).any(1))
    mid = (lung_rows.min() + lung_rows.max()) // 2
    diff = np.abs(eff.image - base.image)[0]
    assert diff[:mid].max() == 0.0  # upper half of the lung fields bit-identical
    assert diff[mid:].max() > 0.1
    assert eff.measurements["ctr"] == pytest.approx(base.measurements["ctr"], abs=0.03)


def test_pneumonia_is_local_opacity(cxr_renders):
    _, r = cxr_renders
    base, pn = r["base"], r["pneumonia"]
    assert pn.measurements["consolidation_area_mm2"] > 300
    m = pn.labels == CXR_LABELS["consolidation"]
    d = (pn.image - base.image)[0]
    assert d[m].mean() > 0.05  # denser
    far = ndi.distance_transform_edt(~m) > 25
    assert np.abs(d[far]).max() == 0.0


def test_cxr_sex_and_age(cxr):
    ident = cxr.sample_identity(9)
    m = cxr.render(ident, BASE_CXR, 128)
    f = cxr.render(ident, {**BASE_CXR, "sex": "F"}, 128)
    old = cxr.render(ident, {**BASE_CXR, "age": 88}, 128)
    assert f.measurements["thorax_width_mm"] < m.measurements["thorax_width_mm"]
    bone_rows = np.isin(m.labels, [2, 3])  # ribs over the lungs are less dense with age, lungs darker
    assert old.image[0][bone_rows].mean() < m.image[0][bone_rows].mean()
    assert old.measurements["ctr"] == pytest.approx(m.measurements["ctr"])


# -- data set writer and CLI ------------------------------------------------------------------------------------------
def _read(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_cli_brain_dataset(tmp_path):
    import nibabel as nib

    out = tmp_path / "brain"
    assert cli_main(["phantoms", "brain", "--n", "4", "--size", "32", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    rows = _read(out / "manifest.csv")
    cols = set(rows[0])
    assert {"path", "subject_id", "split", "age", "sex", "diagnosis", "counterfactual_of", "gt_pair_id",
            "ventricle_ml", "hippocampus_ml"} <= cols
    assert len({r["subject_id"] for r in rows}) == 4
    cfs = [r for r in rows if r["counterfactual_of"]]
    assert cfs and all(r["split"] == "test" for r in cfs)
    for cf in cfs:
        src = next(r for r in rows if r["image_id"] == cf["counterfactual_of"])
        assert src["subject_id"] == cf["subject_id"] and src["gt_pair_id"] == cf["gt_pair_id"]
        assert any(src[k] != cf[k] for k in ("age", "diagnosis"))
    splits = {}
    for r in rows:
        splits.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    img = nib.load(str(out / rows[0]["path"]))
    assert img.shape == (32, 32, 32) and np.allclose(img.header.get_zooms(), 184.0 / 32)
    lab = np.asarray(nib.load(str(out / rows[0]["label_path"])).dataobj)
    assert lab.shape == (32, 32, 32)
    info = json.loads((out / "dataset.json").read_text())
    assert [a["name"] for a in info["attributes"]] == ["age", "sex", "diagnosis"]
    # a fresh render reproduces the stored ground truth
    assert float(rows[0]["ventricle_ml"]) == pytest.approx(BrainPhantom.measure(lab, 184.0 / 32)["ventricle_ml"], abs=1e-3)


def test_cli_cxr_dataset_and_refusals(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "cxr"
    assert cli_main(["phantoms", "cxr", "--n", "5", "--size", "64", "--out", str(out), "--quiet"]) == 0
    rows = _read(out / "manifest.csv")
    assert {"sex", "age", "cardiomegaly", "pleural_effusion", "pneumonia", "ctr", "effusion_area_mm2"} <= set(rows[0])
    im = Image.open(out / rows[0]["path"])
    assert im.size == (64, 64) and np.asarray(im).dtype == np.uint16
    before = sorted(p.name for p in (out / "images").iterdir())
    # non-empty out dir refused without --overwrite, and left untouched
    assert cli_main(["phantoms", "cxr", "--n", "2", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "images").iterdir()) == before
    assert cli_main(["phantoms", "cxr", "--n", "2", "--size", "32", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert len({r["subject_id"] for r in _read(out / "manifest.csv")}) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize("argv, msg", [
    (["phantoms", "liver", "--out", "X"], "unknown phantom kind"),
    (["phantoms", "brain", "--n", "0", "--out", "X"], "--n must be >= 1"),
    (["phantoms", "cxr", "--n", "2", "--size", "4", "--out", "X"], "size for cxr"),
])
def test_cli_bad_input(tmp_path, capsys, argv, msg):
    argv = [a if a != "X" else str(tmp_path / "o") for a in argv]
    assert cli_main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_writer_atomic_on_error(tmp_path, monkeypatch):
    from monai_ld.data.phantoms import writer

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "_save", boom)
    with pytest.raises(RuntimeError):
        write_phantom_dataset("cxr", tmp_path / "d", n=2, size=32)
    assert list(tmp_path.iterdir()) == []
