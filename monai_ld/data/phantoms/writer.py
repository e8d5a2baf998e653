"""Write a phantom data set: images, label maps, ``manifest.csv`` and ``dataset.json``.

Layout of ``out_dir``::

    images/<subject>[_cf<k>].nii.gz | .png      the image (brain: NIfTI float32 with RAS affine; cxr: 16-bit PNG)
    labels/<same name>                           the generator's label map (uint8 NIfTI / 8-bit PNG)
    manifest.csv                                 one row per image (see MANIFEST_BASE_COLUMNS)
    dataset.json                                 attribute specs (AttributeEncoder.to_config()), settings, label names

Subjects are split train/val/test by subject (seeded). Every test subject is also rendered under a changed set
of attributes with the same identity: that row's ``counterfactual_of`` names the factual image's ``image_id`` and
both share a ``gt_pair_id``. Everything is written into a temporary sibling directory and moved into place at the
end, so an error never leaves a partial data set behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .brain import BrainPhantom
from .common import stable_seed
from .cxr import FINDINGS, ChestXrayPhantom

__all__ = ["PHANTOM_KINDS", "get_phantom", "counterfactual_attributes", "write_phantom_dataset", "MANIFEST_BASE_COLUMNS"]

PHANTOM_KINDS = {"brain": BrainPhantom, "cxr": ChestXrayPhantom}
MANIFEST_BASE_COLUMNS = ["image_id", "path", "label_path", "subject_id", "split", "counterfactual_of", "gt_pair_id"]


def get_phantom(kind: str, **kwargs):
    """The generator for ``kind`` (``"brain"`` or ``"cxr"``)."""
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; accepted: {', '.join(PHANTOM_KINDS)}")
    return PHANTOM_KINDS[kind](**kwargs)


def counterfactual_attributes(kind: str, attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A changed attribute set for a ground-truth counterfactual: one attribute intervened on.

    brain: age +/- 15-30 years (kept in range) or another diagnosis; cxr: one finding toggled.
    """
    out = dict(attrs)
    if kind == "brain":
        if rng.uniform() < 0.5:
            dx = [d for d in ("CN", "MCI", "AD") if d != attrs["diagnosis"]]
            out["diagnosis"] = dx[int(rng.integers(len(dx)))]
        else:
            step = float(rng.uniform(15, 30))
            age = attrs["age"] + step if attrs["age"] + step <= 95 else attrs["age"] - step
            out["age"] = float(np.round(np.clip(age, 40, 95), 1))
    else:
        f = FINDINGS[int(rng.integers(len(FINDINGS)))]
        out[f] = 1 - int(attrs[f])
    return out


def _split(n: int, seed: int, fractions=(0.7, 0.15, 0.15)) -> list[str]:
    rng = np.random.default_rng(stable_seed(seed, "split"))
    order = rng.permutation(n)
    n_test = max(1, int(round(n * fractions[2]))) if n >= 3 else (1 if n >= 1 else 0)
    n_val = max(1, int(round(n * fractions[1]))) if n >= 3 else 0
    split = ["train"] * n
    for i in order[:n_test]:
        split[i] = "test"
    for i in order[n_test:n_test + n_val]:
        split[i] = "val"
    return split


def _save(kind: str, path_img: Path, path_lab: Path, render) -> None:
    if kind == "brain":
        import nibabel as nib

        img = nib.Nifti1Image(render.image[0].astype(np.float32), render.affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(path_img))
        lab = nib.Nifti1Image(render.labels.astype(np.uint8), render.affine)
        lab.header.set_xyzt_units("mm")
        nib.save(lab, str(path_lab))
    else:
        from PIL import Image

        arr16 = np.round(np.clip(render.image[0], 0, 1) * 65535).astype(np.uint16)
        Image.fromarray(arr16).save(str(path_img))
        Image.fromarray(render.labels.astype(np.uint8)).save(str(path_lab))


def write_phantom_dataset(
    kind: str,
    out_dir: str | os.PathLike,
    n: int,
    size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    counterfactuals_per_test: int = 1,
    progress: Callable[[int, int], None] | None = None,
    counterfactual_splits: Sequence[str] = ("test",),
) -> Path:
    """Render ``n`` subjects of ``kind`` into ``out_dir`` (+ ground-truth counterfactuals for the test split, or for
    every split in ``counterfactual_splits``).

    Args:
        kind: ``"brain"`` (NIfTI volumes, default size 64) or ``"cxr"`` (16-bit PNG radiographs, default 128).
        n: number of subjects (>= 1).
        seed: fixes identities, attributes, split and counterfactual choices.
        overwrite: replace a non-empty ``out_dir``; without it a non-empty ``out_dir`` is refused.
        counterfactuals_per_test: counterfactual renders per subject of ``counterfactual_splits``.
        counterfactual_splits: the splits whose subjects also get ground-truth counterfactuals; ``("val", "test")``
            gives the validation split its own pairs (δ search and model selection on val, every reported number on
            test). A subject's counterfactual draws come from its own seeded stream, so adding ``"val"`` leaves the
            test rows unchanged.

    Returns:
        the path of ``manifest.csv``.
    """
    phantom = get_phantom(kind)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    size = int(size if size is not None else (64 if kind == "brain" else 128))
    lo, hi = (16, 160) if kind == "brain" else (16, 512)
    if not lo <= size <= hi:
        raise ValueError(f"size for {kind} must be in [{lo}, {hi}], got {size}")
    if counterfactuals_per_test < 0:
        raise ValueError("counterfactuals_per_test must be >= 0")
    cf_splits = tuple(counterfactual_splits)
    if not set(cf_splits) <= {"train", "val", "test"}:
        raise ValueError(f"counterfactual_splits must be among train, val, test; got {list(cf_splits)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ext = ".nii.gz" if kind == "brain" else ".png"
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        enc = phantom.encoder
        names = list(enc.names)
        rows: list[dict[str, Any]] = []
        split = _split(n, seed)
        t0 = time.perf_counter()
        total = n + counterfactuals_per_test * sum(split.count(s) for s in cf_splits)
        done = 0
        meas_cols: list[str] = []
        for i in range(n):
            sid = f"{kind}-{seed}-{i:05d}"
            identity = phantom.sample_identity(stable_seed(seed, "identity", i), subject_id=sid)
            rng = np.random.default_rng(stable_seed(seed, "attributes", i))
            attrs = phantom.sample_attributes(rng)
            jobs = [(sid, attrs, "")]
            if split[i] in cf_splits:
                for k in range(counterfactuals_per_test):
                    jobs.append((f"{sid}_cf{k + 1}", counterfactual_attributes(kind, attrs, rng), sid))
            for image_id, a, cf_of in jobs:
                r = phantom.render(identity, a, size)
                rel_img, rel_lab = f"images/{image_id}{ext}", f"labels/{image_id}{ext}"
                _save(kind, tmp / rel_img, tmp / rel_lab, r)
                meas_cols = list(r.measurements)
                clean = enc.validate(a)
                rows.append({
                    "image_id": image_id, "path": rel_img, "label_path": rel_lab, "subject_id": sid, "split": split[i],
                    "counterfactual_of": cf_of, "gt_pair_id": sid if len(jobs) > 1 else "",
                    **{k: clean[k] for k in names}, **{k: round(float(v), 4) for k, v in r.measurements.items()},
                })
                done += 1
                if progress:
                    progress(done, total)
        elapsed = time.perf_counter() - t0
        cols = MANIFEST_BASE_COLUMNS + names + meas_cols
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        info = {
            "kind": kind,
            "generator": type(phantom).__name__,
            "attributes": enc.to_config(),
            "label_names": phantom.LABELS,
            "measurements": meas_cols,
            "settings": {"n_subjects": n, "n_images": len(rows), "size": size, "seed": seed,
                         "fov_mm": phantom.fov_mm, "counterfactuals_per_test": counterfactuals_per_test,
                         "counterfactual_splits": list(cf_splits),
                         "image_format": "NIfTI float32 [0,1], RAS mm affine" if kind == "brain" else "PNG uint16 (value/65535)",
                         "spacing_mm": phantom.fov_mm / size},
            "splits": {s: split.count(s) for s in ("train", "val", "test")},
            "render_seconds": round(elapsed, 2),
            "mechanisms": sys.modules[type(phantom).__module__].__doc__,
        }
        with open(tmp / "dataset.json", "w") as fh:
            json.dump(info, fh, indent=2)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "manifest.csv"
