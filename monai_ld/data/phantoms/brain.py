"""3D brain-MRI phantom: the MNI ICBM152 2009a T1 template deformed by known mechanisms.

Every subject is an *identity* (a seed and the parameters drawn from it) rendered under *attributes*
(``age``, ``sex``, ``diagnosis``). The render is a pull-back of the template through a chain of maps

``output voxel y -> (identity similarity + smooth identity warp + sex scale) -> q -> attribute flow -> p -> template``

followed by identity contrast (gamma), bias field and Rician noise. Identity randomness comes from named streams
seeded by the identity alone (:func:`~monai_ld.data.phantoms.common.identity_rng`), so the same identity
rendered with other attributes is the exact ground-truth counterfactual.

Causal mechanisms (amounts are boundary displacements in template millimetres for a flat boundary; ``t = (age -
40) / 55`` and ``k`` is the identity's atrophy susceptibility, ~U(0.8, 1.2)):

- ``sex`` -> head size: global isotropic scale ``SEX_SCALE`` of the (large) template (F 0.88, M 0.93; F ~15 % smaller intracranial volume).
- ``age`` -> lateral-ventricle enlargement ``k * 3.0 * t**1.5`` mm, cortical thinning / sulcal (CSF) widening
  ``k * 1.5 * t`` mm, mild medial-temporal (hippocampus + amygdala) shrinkage ``k * 0.5 * t`` mm.
- ``diagnosis`` (severity CN 0, MCI 0.5, AD 1) -> extra medial-temporal shrinkage ``1.5 * s`` mm and extra
  ventricle enlargement ``1.5 * s`` mm; it leaves the rest of the brain bit-identical.

Each mechanism is a smooth velocity field (the blurred gradient of the structure's mask, Gaussian decay, exactly
zero beyond ~4 sigma) integrated in a few Euler steps, so image and label map are deformed together and voxels far
from the affected structures are unchanged. Tissue vacated by medial-temporal shrinkage becomes CSF (intensity
and label), as the temporal horn / choroidal fissure widen in real atrophy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from monai_ld.conditioning import AttributeEncoder, CategoricalAttribute, ContinuousAttribute

from .common import blurred_gradient_field, identity_rng, load_asset, sample_volume, smooth_noise

__all__ = ["BRAIN_LABELS", "BrainIdentity", "BrainPhantom", "PhantomRender", "brain_attribute_encoder"]

BRAIN_ASSET = "brain_mni152_2mm.npz"
BRAIN_LABELS = {
    "background": 0, "csf": 1, "gm": 2, "wm": 3, "ventricle_left": 4, "ventricle_right": 5,
    "hippocampus_left": 6, "hippocampus_right": 7, "amygdala_left": 8, "amygdala_right": 9,
}
SEX_SCALE = {"F": 0.88, "M": 0.93}
DIAGNOSIS_SEVERITY = {"CN": 0.0, "MCI": 0.5, "AD": 1.0}
AGE_RANGE = (40.0, 95.0)


def brain_attribute_encoder() -> AttributeEncoder:
    """The brain model's attributes: ``age`` (40-95 years), ``sex`` (F/M), ``diagnosis`` (CN/MCI/AD)."""
    return AttributeEncoder([
        ContinuousAttribute("age", *AGE_RANGE, "years"),
        CategoricalAttribute("sex", ("F", "M")),
        CategoricalAttribute("diagnosis", ("CN", "MCI", "AD")),
    ])


class PhantomRender(NamedTuple):
    """One rendered phantom.

    ``image``: float32 ``(1, *spatial)`` in [0, 1]; ``labels``: uint8 ``spatial`` label map (see the generator's
    ``LABELS``); ``measurements``: ground-truth structure measurements from that label map; ``affine``: 4x4
    voxel -> mm (RAS for the brain; pixel -> mm for radiographs).
    """

    image: np.ndarray
    labels: np.ndarray
    measurements: dict[str, float]
    affine: np.ndarray


@dataclass(frozen=True)
class BrainIdentity:
    """Everything that makes a subject *this* subject; all of it derives from ``seed``."""

    subject_id: str
    seed: int
    scale: float  # individual head-size factor on top of the sex effect
    rotation_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    warp_mm: float  # std of the smooth random deformation at its control points
    susceptibility: float  # multiplies the age effects ("brain reserve")
    ventricle_offset_mm: float  # individual baseline ventricle size (boundary displacement)
    gamma: float
    bias: float
    noise: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BrainPhantom:
    """Generator of 3D T1-weighted brain phantoms with exact counterfactuals.

    Args:
        fov_mm: edge of the cubic field of view in mm (the output spacing is ``fov_mm / size``).
        flow_steps: Euler steps integrating the attribute velocity field.

    Example::

        ph = BrainPhantom()
        ident = ph.sample_identity(7)
        x = ph.render(ident, {"age": 60, "sex": "F", "diagnosis": "CN"}, size=64)
        x_cf = ph.render(ident, {"age": 60, "sex": "F", "diagnosis": "AD"}, size=64)   # its exact counterfactual
    """

    LABELS = BRAIN_LABELS
    KIND = "brain"

    def __init__(self, fov_mm: float = 184.0, flow_steps: int = 6):
        if fov_mm <= 0 or flow_steps < 1:
            raise ValueError("fov_mm must be > 0 and flow_steps >= 1")
        self.fov_mm = float(fov_mm)
        self.flow_steps = int(flow_steps)
        self.encoder = brain_attribute_encoder()
        a = load_asset(BRAIN_ASSET)
        self._affine = np.asarray(a["affine"], dtype=np.float64)
        self._spacing = float(self._affine[0, 0])
        n = a["t1"].shape[0]
        self._center = self._affine[:3, :3] @ np.full(3, (n - 1) / 2.0) + self._affine[:3, 3]
        self._fields = _brain_fields()

    # -- identities and attributes ------------------------------------------------------------------------------
    def sample_identity(self, seed: int, subject_id: str | None = None) -> BrainIdentity:
        """The identity of seed ``seed`` (deterministic)."""
        r = identity_rng(seed, "brain-params")
        return BrainIdentity(
            subject_id=subject_id if subject_id is not None else f"brain-{seed}",
            seed=int(seed),
            scale=float(np.exp(np.clip(r.normal(0, 0.03), -0.07, 0.07))),
            rotation_deg=tuple(float(v) for v in np.clip(r.normal(0, 3.0, 3), -6, 6)),
            shift_mm=tuple(float(v) for v in np.clip(r.normal(0, 2.0, 3), -5, 5)),
            warp_mm=float(r.uniform(1.0, 3.0)),
            susceptibility=float(r.uniform(0.8, 1.2)),
            ventricle_offset_mm=float(np.clip(r.normal(0.3, 0.5), -0.4, 1.2)),
            gamma=float(r.uniform(0.8, 1.25)),
            bias=float(r.uniform(0.03, 0.10)),
            noise=float(r.uniform(0.01, 0.035)),
        )

    def sample_attributes(self, rng: np.random.Generator) -> dict[str, Any]:
        """A plausible attribute draw: age ~ U(45, 92), sex 50/50, AD/MCI more likely with age."""
        age = float(np.round(rng.uniform(45, 92), 1))
        t = (age - 45) / 47
        p_ad, p_mci = 0.1 + 0.3 * t, 0.2 + 0.1 * t
        u = rng.uniform()
        dx = "AD" if u < p_ad else "MCI" if u < p_ad + p_mci else "CN"
        return {"age": age, "sex": "F" if rng.uniform() < 0.5 else "M", "diagnosis": dx}

    def mechanism_amounts(self, identity: BrainIdentity, attributes: Mapping[str, Any]) -> dict[str, float]:
        """Boundary displacements (mm) and the global scale that ``attributes`` cause for ``identity``."""
        v = self.encoder.validate(attributes)
        t = (v["age"] - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])
        s = DIAGNOSIS_SEVERITY[v["diagnosis"]]
        k = identity.susceptibility
        return {
            "scale": SEX_SCALE[v["sex"]] * identity.scale,
            "ventricle_mm": identity.ventricle_offset_mm + k * 3.0 * t**1.5 + 1.5 * s,
            "cortex_mm": k * 1.5 * t,
            "mtl_mm": k * 0.5 * t + 1.5 * s,
        }

    # -- geometry ---------------------------------------------------------------------------------------------------
    def output_affine(self, size: int) -> np.ndarray:
        """Voxel -> mm (RAS) affine of a ``size``^3 render: isotropic ``fov_mm / size`` spacing, centred on 0."""
        sp = self.fov_mm / size
        aff = np.diag([sp, sp, sp, 1.0])
        aff[:3, 3] = -sp * (size - 1) / 2.0
        return aff

    def _identity_coords(self, identity: BrainIdentity, scale: float, size: int) -> torch.Tensor:
        """Template voxel coordinates ``(S, S, S, 3)`` of the output grid before the attribute flow."""
        sp = self.fov_mm / size
        ax = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * sp
        y = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1)  # subject mm
        rot = Rotation.from_euler("xyz", identity.rotation_deg, degrees=True).as_matrix().astype(np.float32)
        q = (y / scale) @ rot.T + self._center.astype(np.float32) + np.asarray(identity.shift_mm, np.float32)
        warp = smooth_noise(identity_rng(identity.seed, "brain-warp"), (size,) * 3, 5, channels=3)
        q += np.moveaxis(warp, 0, -1) * identity.warp_mm
        vox = (q - self._affine[:3, 3].astype(np.float32)) / self._spacing
        return torch.from_numpy(np.ascontiguousarray(vox, dtype=np.float32))

    # -- rendering ----------------------------------------------------------------------------------------------------
    def render(self, identity: BrainIdentity, attributes: Mapping[str, Any], size: int = 64) -> PhantomRender:
        """Render ``identity`` under ``attributes`` on a ``size``^3 grid (16 <= size <= 160).

        Returns a :class:`PhantomRender`: image ``(1, S, S, S)`` float32 in [0, 1], label map ``(S, S, S)`` uint8
        (:data:`BRAIN_LABELS`), measurements (volumes in ml from the label map), RAS affine.
        """
        if not 16 <= int(size) <= 160:
            raise ValueError(f"size must be in [16, 160], got {size}")
        size = int(size)
        amt = self.mechanism_amounts(identity, attributes)
        f = self._fields
        q = self._identity_coords(identity, amt["scale"], size)
        vel = amt["ventricle_mm"] * f["vent"] + amt["cortex_mm"] * f["cortex"] + amt["mtl_mm"] * f["mtl"]
        vel = torch.from_numpy(vel / self._spacing)  # voxels per unit time
        p = q.clone()
        for _ in range(self.flow_steps):
            p += sample_volume(vel, p).permute(1, 2, 3, 0) / self.flow_steps
        chans = sample_volume(_smoothed_template(self.fov_mm / size / self._spacing), p)
        t1, mtl_p, brain = chans[0], chans[1], chans[2]
        mtl_q = sample_volume(f["mtl_mask_t"], q)[0]
        labels = sample_volume(f["labels_t"], p, mode="nearest")[0].round().to(torch.uint8)
        # medial-temporal tissue lost to atrophy is replaced by CSF
        vac = (mtl_q - mtl_p).clamp(0.0, 1.0)
        t1 = t1 * (1 - vac) + f["csf_level"] * vac
        lab_q = sample_volume(f["labels_t"], q, mode="nearest")[0].round().to(torch.uint8)
        lost = (vac > 0.5) & (labels != lab_q) & ((lab_q >= 6) & (lab_q <= 9))
        labels[lost] = BRAIN_LABELS["csf"]
        # identity appearance: contrast, bias field, Rician noise inside the (skull-stripped) brain
        img = t1.clamp(0, 1) ** identity.gamma
        bias = smooth_noise(identity_rng(identity.seed, "brain-bias"), (size,) * 3, 4)[0]
        img = img * torch.from_numpy(np.exp(identity.bias * bias))
        n = identity_rng(identity.seed, "brain-noise").standard_normal((2, size, size, size), dtype=np.float32)
        n = torch.from_numpy(n) * identity.noise
        img = torch.sqrt((img + n[0]) ** 2 + n[1] ** 2)
        img = img * (brain > 0.5)
        labels[brain <= 0.5] = 0
        image = img.clamp(0, 1).numpy()[None].astype(np.float32)
        labels = labels.numpy()
        return PhantomRender(image, labels, self.measure(labels, self.fov_mm / size), self.output_affine(size))

    @staticmethod
    def measure(labels: np.ndarray, spacing_mm: float) -> dict[str, float]:
        """Ground-truth volumes (ml) from a brain label map with isotropic ``spacing_mm``."""
        counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=len(BRAIN_LABELS))
        ml = spacing_mm**3 / 1000.0
        vol = {name: float(counts[i] * ml) for name, i in BRAIN_LABELS.items() if name != "background"}
        return {
            "ventricle_ml": vol["ventricle_left"] + vol["ventricle_right"],
            "hippocampus_ml": vol["hippocampus_left"] + vol["hippocampus_right"],
            "amygdala_ml": vol["amygdala_left"] + vol["amygdala_right"],
            "gm_ml": vol["gm"],
            "wm_ml": vol["wm"],
            "csf_ml": vol["csf"],
            "brain_ml": float(counts[1:].sum() * ml),
        }


@functools.lru_cache(maxsize=1)
def _brain_fields() -> dict[str, Any]:
    """Template-space unit velocity fields of the three mechanisms, masks and reference intensities."""
    a = load_asset(BRAIN_ASSET)
    sp = float(a["affine"][0, 0])
    lab = a["labels"]
    gm = a["gm"].astype(np.float32) / 255.0
    wm = a["wm"].astype(np.float32) / 255.0
    vent = np.isin(lab, [4, 5])
    mtl = np.isin(lab, [6, 7, 8, 9])
    tissue = np.clip(gm + wm, 0, 1) * (lab > 0)
    # cortical thinning acts on the cortical ribbon only: GM within ~8 mm of the brain's outer CSF/background
    outside = (lab == 0) | (lab == 1)
    near_surface = ndi.distance_transform_edt(~outside, sampling=sp) < 8.0
    ribbon = ndi.gaussian_filter(((lab == 2) & near_surface & ~mtl).astype(np.float32), 1.0)
    t1 = a["t1"].astype(np.float32) / 255.0
    return {
        "vent": -blurred_gradient_field(vent, 4.0, sp),  # inward: sampling towards the ventricle enlarges it
        "mtl": blurred_gradient_field(mtl, 3.0, sp),  # outward: sampling away from the structure shrinks it
        "cortex": blurred_gradient_field(tissue > 0.5, 2.0, sp, weight=ribbon),
        "mtl_mask_t": torch.from_numpy(mtl.astype(np.float32)[None]),
        "labels_t": torch.from_numpy(lab.astype(np.float32)[None]),
        "csf_level": float(np.median(t1[vent])),
    }


@functools.lru_cache(maxsize=8)
def _smoothed_template(ratio: float) -> torch.Tensor:
    """``(3, ...)``: T1 (anti-aliased for an output spacing ``ratio`` times the template's), MTL mask, brain mask."""
    a = load_asset(BRAIN_ASSET)
    t1 = a["t1"].astype(np.float32) / 255.0
    sigma = 0.42 * math.sqrt(max(ratio**2 - 1.0, 0.0))
    if sigma > 0.05:
        t1 = ndi.gaussian_filter(t1, sigma)
    lab = a["labels"]
    mtl = np.isin(lab, [6, 7, 8, 9]).astype(np.float32)
    brain = (lab > 0).astype(np.float32)
    return torch.from_numpy(np.stack([t1, mtl, brain]))


