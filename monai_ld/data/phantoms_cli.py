"""``monai-ld phantoms brain|cxr``: write a phantom data set with exact ground-truth counterfactuals."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "phantoms",
        help="render a phantom data set (brain MRI volumes or chest radiographs) with ground-truth counterfactuals",
        description="Render N subjects from real anatomy deformed by known mechanisms; writes images, label maps, "
        "manifest.csv (attributes, split, counterfactual pairs, ground-truth measurements) and dataset.json.",
    )
    p.add_argument("kind", help="brain (3D T1 NIfTI: age, sex, diagnosis) or cxr (2D PNG: sex, age, cardiomegaly, "
                   "pleural_effusion, pneumonia)")
    p.add_argument("--n", type=int, default=20, help="number of subjects (>= 1)")
    p.add_argument("--size", type=int, default=None, help="edge length: brain volumes S^3 (default 64), cxr S^2 (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--counterfactuals", type=int, default=1, help="ground-truth counterfactual renders per test subject")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from monai_ld.data.phantoms.writer import PHANTOM_KINDS, write_phantom_dataset

    if args.kind not in PHANTOM_KINDS:
        raise ValueError(f"unknown phantom kind {args.kind!r}; accepted: {', '.join(PHANTOM_KINDS)}")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")

    def progress(i, total):
        if not args.quiet and (i == total or i % 10 == 0):
            print(f"\r{i}/{total} images", end="\n" if i == total else "", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    manifest = write_phantom_dataset(args.kind, args.out, n=args.n, size=args.size, seed=args.seed,
                                     overwrite=args.overwrite, counterfactuals_per_test=args.counterfactuals,
                                     progress=progress)
    if not args.quiet:
        print(f"wrote {manifest} in {time.perf_counter() - t0:.1f} s")
    return 0
