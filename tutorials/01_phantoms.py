"""Tutorial 01: phantom data sets with exact ground-truth counterfactuals.

Run::

    python tutorials/01_phantoms.py [OUTPUT_DIR]      # default: tutorials/output/

What it does (about a minute on 2 CPU cores):

1. writes two small data sets with the same code path as ``monai-ld phantoms brain|cxr`` (manifest.csv,
   dataset.json, NIfTI / PNG images and label maps) under ``OUTPUT_DIR/data``;
2. ``brain_subjects.png``: several brain subjects (axial slice through the ventricles, coronal slice through
   the hippocampi) - the identity (shape, contrast, bias, noise) and attributes vary;
3. ``brain_counterfactuals.png``: ONE subject rendered at several ages and under CN / MCI / AD, with the difference
   to the reference render: only the ventricles, cortex and medial temporal lobe change;
4. ``cxr_findings.png``: ONE chest identity without findings, with each finding, with all three, and as female,
   with difference maps and the generator's label contours.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from monai_ld.data.phantoms import CXR_LABELS, BrainPhantom, ChestXrayPhantom, write_phantom_dataset  # noqa: E402


def brain_slices(render):
    """Axial slice through the ventricles and coronal slice through the hippocampi (display orientation)."""
    lab = render.labels
    vz = int(np.argwhere(np.isin(lab, [4, 5]))[:, 2].mean()) if np.isin(lab, [4, 5]).any() else lab.shape[2] // 2
    hy = int(np.argwhere(np.isin(lab, [6, 7]))[:, 1].mean()) if np.isin(lab, [6, 7]).any() else lab.shape[1] // 2
    return vz, hy


def show(ax, arr, title=None, cmap="gray", vmin=0, vmax=1):
    ax.imshow(arr.T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. two small data sets, exactly what the CLI writes -----------------------------------------------------------
    for kind, n in (("brain", 6), ("cxr", 8)):
        manifest = write_phantom_dataset(kind, out_dir / "data" / kind, n=n, seed=0, overwrite=True)
        print("wrote", manifest)

    brain = BrainPhantom()
    size = 96

    # 2. several brain subjects ---------------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(2, 6, figsize=(13, 4.8))
    for j in range(6):
        ident = brain.sample_identity(100 + j)
        attrs = brain.sample_attributes(rng)
        r = brain.render(ident, attrs, size)
        vz, hy = brain_slices(r)
        show(axes[0, j], r.image[0][:, :, vz], f"{attrs['sex']}, {attrs['age']:.0f} y, {attrs['diagnosis']}")
        show(axes[1, j], r.image[0][:, hy, :])
    axes[0, 0].set_ylabel("axial")
    axes[1, 0].set_ylabel("coronal")
    fig.suptitle("Brain phantoms: MNI152 anatomy, per-subject shape / contrast / bias / noise (neurological view)")
    fig.tight_layout()
    fig.savefig(out_dir / "brain_subjects.png", dpi=80)
    plt.close(fig)

    # 3. one subject across ages and diagnoses: the exact counterfactuals ---------------------------------------------
    ident = brain.sample_identity(7)
    settings = [({"age": 50, "sex": "F", "diagnosis": "CN"}, "age 50, CN (reference)"),
                ({"age": 70, "sex": "F", "diagnosis": "CN"}, "age 70, CN"),
                ({"age": 90, "sex": "F", "diagnosis": "CN"}, "age 90, CN"),
                ({"age": 50, "sex": "F", "diagnosis": "MCI"}, "age 50, MCI"),
                ({"age": 50, "sex": "F", "diagnosis": "AD"}, "age 50, AD")]
    renders = [brain.render(ident, a, size) for a, _ in settings]
    ref = renders[0]
    vz, hy = brain_slices(ref)
    fig, axes = plt.subplots(4, len(settings), figsize=(2.6 * len(settings), 10.4))
    for j, ((a, title), r) in enumerate(zip(settings, renders)):
        m = r.measurements
        show(axes[0, j], r.image[0][:, :, vz], f"{title}\nvent {m['ventricle_ml']:.1f} ml, hip {m['hippocampus_ml']:.1f} ml")
        show(axes[1, j], (r.image - ref.image)[0][:, :, vz], None, cmap="RdBu_r", vmin=-0.5, vmax=0.5)
        show(axes[2, j], r.image[0][:, hy, :])
        show(axes[3, j], (r.image - ref.image)[0][:, hy, :], None, cmap="RdBu_r", vmin=-0.5, vmax=0.5)
    for i, t in enumerate(["axial", "difference", "coronal", "difference"]):
        axes[i, 0].set_ylabel(t)
    fig.suptitle("One identity, changed attributes: ventricles grow and cortex thins with age;\n"
                 "MCI/AD shrink the hippocampus and amygdala (blue = darker, red = brighter than the reference)")
    fig.tight_layout()
    fig.savefig(out_dir / "brain_counterfactuals.png", dpi=80)
    plt.close(fig)

    # 4. chest radiographs: one identity with each finding ------------------------------------------------------------
    cxr = ChestXrayPhantom()
    ident = cxr.sample_identity(5)
    base = {"sex": "M", "age": 55, "cardiomegaly": 0, "pleural_effusion": 0, "pneumonia": 0}
    variants = [("no finding", base), ("cardiomegaly", {**base, "cardiomegaly": 1}),
                ("pleural effusion", {**base, "pleural_effusion": 1}), ("pneumonia", {**base, "pneumonia": 1}),
                ("all three", {**base, "cardiomegaly": 1, "pleural_effusion": 1, "pneumonia": 1}),
                ("female, 85 y", {**base, "sex": "F", "age": 85})]
    rr = [cxr.render(ident, a, 128) for _, a in variants]
    fig, axes = plt.subplots(2, len(variants), figsize=(2.7 * len(variants), 6.2))
    colors = {"heart": "tab:orange", "effusion": "tab:cyan", "consolidation": "tab:red"}
    for j, ((title, _), r) in enumerate(zip(variants, rr)):
        m = r.measurements
        axes[0, j].imshow(r.image[0], cmap="gray", vmin=0, vmax=1)
        for name, c in colors.items():
            mask = r.labels == CXR_LABELS[name]
            if mask.any() and title != "no finding":
                axes[0, j].contour(mask, levels=[0.5], colors=c, linewidths=0.8)
        axes[0, j].set_title(f"{title}\nCTR {m['ctr']:.2f}", fontsize=9)
        axes[1, j].imshow((r.image - rr[0].image)[0], cmap="RdBu_r", vmin=-0.4, vmax=0.4)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("radiograph (+ GT contours)")
    axes[1, 0].set_ylabel("difference to no finding")
    fig.suptitle("Chest X-ray phantoms (DRR of a real CT): one identity, each finding is a local 3D change "
                 "(orange heart, cyan effusion, red consolidation)")
    fig.tight_layout()
    fig.savefig(out_dir / "cxr_findings.png", dpi=80)
    plt.close(fig)
    print("figures in", out_dir)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "output")
