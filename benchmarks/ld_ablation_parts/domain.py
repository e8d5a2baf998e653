"""Source and target domains of CXR phantoms: the target is another "site" (acquisition) with another population.

Nothing in the renderer changes: the acquisition of a radiograph is already a per-identity draw (``exposure`` = the
offset of the film-like characteristic curve, ``gamma`` = its slope, ``noise`` = detector/quantum noise) plus the
detector field of view (``ChestXrayPhantom(fov_mm=...)``, collimation/magnification). The target site draws these
from other ranges (``dataclasses.replace`` of the identity: anatomy, findings' severity and site stay the
subject's own), so the disease mechanisms and their effect sizes are untouched. Physical reading:

- ``gamma`` 0.55-0.70 (source 0.85-1.20): a flatter characteristic curve = lower subject contrast, what a harder
  (higher-kVp) beam and a different detector/look-up table give;
- ``exposure`` 1.15-1.30 (source 0.92-1.08): the curve's offset moves (another dose / processing; the per-image
  percentile scaling of the preprocessing removes only its linear part);
- ``noise`` 0.035-0.050 (source 0.008-0.025): a lower-dose / noisier detector;
- ``fov_mm`` 310 (source 360): tighter collimation, the chest fills more of the image.

Population: age ~ U(55, 90) (source U(20, 90)); cardiomegaly in exactly half the subjects (alternating, so every
split is balanced for the downstream AUC); effusion / pneumonia with the source's age-dependent rate.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from monai_ld.data.phantoms.cxr import FINDINGS, ChestXrayPhantom
from monai_ld.transforms.chains import chest_xray_transforms

SOURCE_FOV_MM = 360.0
TARGET = {"fov_mm": 310.0, "gamma": (0.55, 0.70), "exposure": (1.15, 1.30), "noise": (0.035, 0.050), "age": (55.0, 90.0)}
# subject seeds of each split; disjoint ranges so no subject is in two splits
SPLIT_BASE = {"source": 910_000, "finetune": 920_000, "val": 930_000, "test": 940_000, "pairs": 950_000, "oracle": 960_000}


class Domains:
    """Renders preprocessed ``(1, S, S)`` images of both domains exactly as the bundle's model sees them."""

    def __init__(self, size: int = 128):
        self.size = int(size)
        self.source = ChestXrayPhantom(fov_mm=SOURCE_FOV_MM)
        self.target = ChestXrayPhantom(fov_mm=TARGET["fov_mm"])
        self.encoder = self.source.encoder
        self._prep = chest_xray_transforms(size=self.size, load=False)

    def prep(self, image: np.ndarray) -> torch.Tensor:
        # the bundle's data path reads 16-bit PNGs, and MONAI's PNG reader puts image columns first: transpose the
        # rendered (rows, cols) array so a render looks to the model exactly like its training data
        arr = np.ascontiguousarray(np.round(np.clip(image[0], 0, 1) * 65535).astype(np.float32).T / 65535.0)
        return torch.as_tensor(self._prep({"image": arr[None]})["image"]).float()

    def identity(self, domain: str, seed: int):
        ident = self.source.sample_identity(seed)
        if domain == "source":
            return ident
        r = np.random.default_rng([seed, 14])  # the site's acquisition draw, independent of the anatomy draw
        return dataclasses.replace(ident, gamma=float(r.uniform(*TARGET["gamma"])),
                                   exposure=float(r.uniform(*TARGET["exposure"])), noise=float(r.uniform(*TARGET["noise"])))

    def attributes(self, domain: str, seed: int, index: int) -> dict:
        r = np.random.default_rng([seed, 15])
        if domain == "source":
            return self.source.sample_attributes(r)
        age = float(np.round(r.uniform(*TARGET["age"]), 1))
        p = 0.12 + 0.25 * (age - 20) / 70
        row = {"sex": "F" if r.uniform() < 0.5 else "M", "age": age, **{f: int(r.uniform() < p) for f in FINDINGS}}
        row["cardiomegaly"] = index % 2
        return row

    def render(self, domain: str, seed: int, attributes: dict) -> torch.Tensor:
        ph = self.source if domain == "source" else self.target
        return self.prep(ph.render(self.identity(domain, seed), attributes, size=self.size).image)

    def split(self, name: str, n: int) -> tuple[torch.Tensor, list[dict]]:
        """``n`` real images of split ``name`` (the ``source`` split is source-domain, all others target)."""
        domain = "source" if name == "source" else "target"
        rows, images = [], []
        for i in range(n):
            seed = SPLIT_BASE[name] + i
            row = self.attributes(domain, seed, i)
            rows.append(row)
            images.append(self.render(domain, seed, row))
        return torch.stack(images) if images else torch.zeros(0, 1, self.size, self.size), rows

    def pairs(self, n: int) -> dict:
        """``n`` target-domain test pairs: factual image, the exact counterfactual with cardiomegaly switched."""
        x, gt, src, tgt = [], [], [], []
        for i in range(n):
            seed = SPLIT_BASE["pairs"] + i
            row = self.attributes("target", seed, i)
            cf = {**row, "cardiomegaly": 1 - row["cardiomegaly"]}
            x.append(self.render("target", seed, row))
            gt.append(self.render("target", seed, cf))
            src.append(row)
            tgt.append(cf)
        return {"inputs": torch.stack(x), "ground_truth": torch.stack(gt), "source_rows": src, "target_rows": tgt}
