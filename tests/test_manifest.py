"""Manifests (CSV/JSON, validation, subject-level splits) and the CheXpert / ADNI / OASIS-3 adapters."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import pytest
import torch
from monai.data import DataLoader, Dataset

from monai_ld.conditioning import AttributeEncoder, CategoricalAttribute, ConditionError, ContinuousAttribute
from monai_ld.data.adapters import adni_manifest, brain_encoder, chexpert_encoder, chexpert_manifest, oasis3_manifest
from monai_ld.data.manifest import Manifest, assign_splits, read_rows, write_rows
from monai_ld.transforms import EncodeAttributesd, brain_mri_transforms

TABLES = Path(__file__).parent / "data" / "tables"
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def _enc():
    return AttributeEncoder([ContinuousAttribute("age", 40, 95, "years"), CategoricalAttribute("sex", ("F", "M"))])


def _rows(n_subjects=20, per_subject=3):
    return [{"path": f"s{s:02d}_{k}.nii.gz", "subject_id": f"s{s:02d}", "age": 50 + s, "sex": "FM"[s % 2]}
            for s in range(n_subjects) for k in range(per_subject)]


def test_assign_splits_is_subject_level_and_deterministic():
    rows = _rows(40, 3)
    a = assign_splits(rows, (0.7, 0.15, 0.15), seed=1)
    by_subject = defaultdict(set)
    for r in a:
        by_subject[r["subject_id"]].add(r["split"])
    assert all(len(s) == 1 for s in by_subject.values())
    counts = {sp: sum(1 for s in by_subject.values() if sp in s) for sp in ("train", "val", "test")}
    assert counts == {"train": 28, "val": 6, "test": 6}
    rev = assign_splits(list(reversed(rows)), (0.7, 0.15, 0.15), seed=1)  # depends on subjects + seed, not row order
    assert {r["subject_id"]: r["split"] for r in rev} == {r["subject_id"]: r["split"] for r in a}
    assert [r["split"] for r in a] != [r["split"] for r in assign_splits(rows, (0.7, 0.15, 0.15), seed=2)]
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(rows, (0.7, 0.2, 0.2))


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_manifest_roundtrip(tmp_path, suffix):
    enc = _enc()
    m = Manifest.from_rows(assign_splits(_rows(), seed=0), enc, require_split=True)
    out = m.write(tmp_path / f"m{suffix}")
    with pytest.raises(FileExistsError):
        m.write(out)
    back = Manifest.read(out, encoder=enc if suffix == ".csv" else None)
    assert back.rows == m.rows
    assert back.attribute_columns == ["age", "sex"]
    if suffix == ".json":
        assert back.encoder.to_config() == enc.to_config()  # the JSON carries the encoder config
    items = back.to_monai(split="train")
    assert items and all(i["split"] == "train" and Path(i["image"]).is_absolute() for i in items)
    assert not list(tmp_path.glob(".*tmp"))


def test_unknown_column_and_bad_values_name_row_and_column(tmp_path):
    enc = _enc()
    rows = assign_splits(_rows(4, 1), seed=0)
    rows[0]["bmi"] = 22
    with pytest.raises(ConditionError, match=r"\['bmi'\] are not attributes.*extra_columns"):
        Manifest.from_rows(rows, enc)
    assert Manifest.from_rows(rows, enc, extra_columns=["bmi"]).extra_columns == ["bmi"]

    rows = assign_splits(_rows(4, 1), seed=0)
    rows[2]["age"] = 120
    rows[3]["sex"] = "X"
    p = write_rows(rows, tmp_path / "bad.csv")
    with pytest.raises(ConditionError) as e:
        Manifest.read(p, encoder=enc)
    msg = str(e.value)
    assert "row 3 (subject_id='s02'): column 'age'" in msg and "out of range" in msg and "[40, 95]" in msg
    assert "row 4 (subject_id='s03'): column 'sex'" in msg and "one of F, M" in msg

    rows = assign_splits(_rows(4, 1), seed=0)
    rows[1]["split"] = "training"
    with pytest.raises(ValueError, match=r"row 2.*'split' = 'training'; accepted: train, val, test"):
        Manifest.from_rows(rows, enc)
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['split'\]"):
        Manifest.from_rows(_rows(2, 1), enc)
    with pytest.raises(ValueError, match="does not exist"):
        Manifest.from_rows([dict(rows[0], split="train")], enc, check_files=True, root=tmp_path)


def test_manifest_feeds_monai_dataset_with_real_scan(tmp_path):
    shutil.copy(ANATOMICAL, tmp_path / "sub01.nii")
    shutil.copy(ANATOMICAL, tmp_path / "sub02.nii")
    rows = [{"path": "sub01.nii", "subject_id": "sub01", "split": "train", "age": 70, "sex": "F", "site": "A"},
            {"path": "sub02.nii", "subject_id": "sub02", "split": "train", "age": 81.5, "sex": "M", "site": "B"}]
    enc = _enc()
    write_rows(rows, tmp_path / "manifest.csv")
    m = Manifest.read(tmp_path / "manifest.csv", encoder=enc, extra_columns=["site"], check_files=True)
    tr = brain_mri_transforms(spatial_size=(32, 32, 32), pixdim=(3.0, 3.0, 3.0), encoder=enc)
    batch = next(iter(DataLoader(Dataset(m.to_monai("train"), tr), batch_size=2)))
    assert batch["image"].shape == (2, 1, 32, 32, 32)
    assert batch["condition"].shape == (2, 1, enc.dim)
    torch.testing.assert_close(batch["condition"], enc.context([{"age": 70, "sex": "F"}, {"age": 81.5, "sex": "M"}]))


# ---- adapters --------------------------------------------------------------------------------------------------------


def test_chexpert_policies():
    enc = chexpert_encoder()
    ones = chexpert_manifest(TABLES / "chexpert_train.csv", policy="U-ones")
    zeros = chexpert_manifest(TABLES / "chexpert_train.csv", policy="U-zeros")
    ignore = chexpert_manifest(TABLES / "chexpert_train.csv", policy="ignore")
    # 12 images; patient00006 has Sex 'Unknown' -> skipped under every policy
    assert len(ones) == len(zeros) == 11 and len(ignore) == 9
    assert any("Unknown" in n for n in ones.notes)
    row = {r["path"]: r for r in ones.rows}["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"]
    assert (row["subject_id"], row["sex"], row["age"]) == ("patient00002", "F", 87.0)
    assert row["cardiomegaly"] == "present" and row["pleural_effusion"] == "present"  # -1.0 under U-ones
    row0 = {r["path"]: r for r in zeros.rows}["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"]
    assert row0["cardiomegaly"] == "absent" and row0["pleural_effusion"] == "absent"  # -1.0 under U-zeros
    assert row["pneumonia"] == "absent"  # blank = not mentioned -> absent
    for m in (ones, zeros, ignore):
        splits = defaultdict(set)
        for r in m.rows:
            splits[r["subject_id"]].add(r["split"])
            enc.encode({k: r[k] for k in enc.names})
        assert all(len(s) == 1 for s in splits.values())
    frontal = chexpert_manifest(TABLES / "chexpert_train.csv", frontal_only=True)
    assert len(frontal) == 9 and all(r["view"] == "Frontal" for r in frontal.rows)
    with pytest.raises(ConditionError, match="row 10: sex 'Unknown'"):
        chexpert_manifest(TABLES / "chexpert_train.csv", on_invalid="raise")
    with pytest.raises(ValueError, match="accepted: U-ones, U-zeros, ignore"):
        chexpert_manifest(TABLES / "chexpert_train.csv", policy="U-maybe")


def test_chexpert_bad_label_and_missing_column(tmp_path):
    rows, _ = read_rows(TABLES / "chexpert_train.csv")
    rows[0]["Cardiomegaly"] = 2.0
    bad = write_rows(rows, tmp_path / "train.csv")
    with pytest.raises(ValueError, match=r"row 1: column 'Cardiomegaly' = 2\.0; accepted: 1\.0, 0\.0, -1\.0 or blank"):
        chexpert_manifest(bad)
    for r in rows:
        del r["Pneumonia"]
    with pytest.raises(ValueError, match=r"missing column\(s\) \['Pneumonia'\]"):
        chexpert_manifest(write_rows(rows, tmp_path / "train2.csv"))


def test_adni_adapter():
    m = adni_manifest(TABLES / "adnimerge.csv", path_pattern="{PTID}/{VISCODE}/t1.nii.gz", image_root="/data/adni")
    assert len(m) == 11 and any("diagnosis None" in n for n in m.notes)  # m36 row has a blank DX
    r = {(x["subject_id"], x["visit"]): x for x in m.rows}
    assert r[("011_S_0003", "m12")]["age"] == pytest.approx(82.3)  # AGE + Years_bl
    assert r[("011_S_0003", "m12")]["diagnosis"] == "AD"  # Dementia -> AD
    assert r[("100_S_0006", "bl")]["diagnosis"] == "MCI" and r[("100_S_0006", "m24")]["diagnosis"] == "AD"
    assert r[("100_S_0006", "bl")]["sex"] == "F"
    assert r[("011_S_0002", "m06")]["path"] == "011_S_0002/m06/t1.nii.gz"
    assert m.to_monai()[0]["image"].startswith("/data/adni/")
    assert len({x["split"] for x in m.rows if x["subject_id"] == "100_S_0006"}) == 1
    with pytest.raises(ValueError, match="path_pattern.*needs field 'SCAN'"):
        adni_manifest(TABLES / "adnimerge.csv", path_pattern="{SCAN}.nii.gz")


def test_adni_baseline_diagnosis_and_age_range(tmp_path):
    rows, _ = read_rows(TABLES / "adnimerge.csv")
    for r in rows:
        del r["DX"]
    p = write_rows(rows, tmp_path / "adni_bl.csv")
    m = adni_manifest(p, path_pattern="{PTID}_{VISCODE}.nii.gz", split_fractions=None)
    assert len(m) == 12 and "split" not in m.rows[0]
    dx = {x["subject_id"]: x["diagnosis"] for x in m.rows}
    assert dx["022_S_0004"] == "MCI" and dx["011_S_0010"] == "AD"  # LMCI -> MCI, AD -> AD
    narrow = brain_encoder(age_range=(60, 80))
    with pytest.raises(ConditionError, match=r"row 3: attribute 'age': 81\.3 is out of range"):
        adni_manifest(p, path_pattern="{PTID}.nii.gz", encoder=narrow, on_invalid="raise")


def test_oasis3_adapter():
    m = oasis3_manifest(TABLES / "oasis3_clinical.csv", path_pattern="{subject_id}/{visit}/anat/T1w.nii.gz")
    assert len(m) == 10
    assert sorted(m.notes) == ["skipped 1 row(s): dx1 'Vascular Demt- primary' is not a CN/MCI/AD diagnosis",
                               "skipped 1 row(s): no dx1 and no CDR"]
    dx = {(x["subject_id"], x["visit"]): x["diagnosis"] for x in m.rows}
    assert dx[("OAS30002", "d0000")] == "MCI"  # uncertain dementia
    assert dx[("OAS30005", "d0000")] == "CN"  # no dx1 -> CDR 0
    assert dx[("OAS30009", "d0000")] == "AD"  # no dx1 -> CDR 2
    assert dx[("OAS30010", "d0000")] == "AD"  # DAT
    assert dx[("OAS30006", "d0000")] == "MCI"  # 0.5 in memory only
    assert {x["path"] for x in m.rows} >= {"OAS30001/d1800/anat/T1w.nii.gz"}


def test_oasis3_gender_codes_and_cdr_only(tmp_path):
    p = tmp_path / "oasis3_demo.csv"
    p.write_text("Subject,ageAtEntry,GENDER,CDR,MR ID\nOAS30100,70,1,0,OAS30100_MR_d0000\n"
                 "OAS30101,72,2,0.5,OAS30101_MR_d0000\nOAS30102,75,2,1,OAS30102_MR_d0000\n")
    m = oasis3_manifest(p, path_pattern="{visit}.nii.gz", split_fractions=None)
    assert [(r["sex"], r["diagnosis"], r["path"]) for r in m.rows] == [
        ("M", "CN", "OAS30100_MR_d0000.nii.gz"), ("F", "MCI", "OAS30101_MR_d0000.nii.gz"),
        ("F", "AD", "OAS30102_MR_d0000.nii.gz")]
    p.write_text("Subject,Age,M/F\nOAS1,70,F\n")
    with pytest.raises(ValueError, match="no diagnosis column; accepted: dx1 or CDR"):
        oasis3_manifest(p, path_pattern="{Subject}.nii")


def test_read_rows_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "none.csv")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_rows(tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(ValueError, match="'rows' list"):
        read_rows(tmp_path / "m.json")
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(ValueError, match="accepted: .csv, .tsv, .json"):
        read_rows(tmp_path / "m.xlsx")
