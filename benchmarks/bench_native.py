"""Native-resolution costs of the brain bundle, side by side, with the bars of issue #16 next to the figures.

(a) one counterfactual of a synthetic 1 mm 182×218×182 NIfTI (the bundled sample phantom resampled with nibabel,
    int16, written to and read from a temp dir): native composition vs the whole-volume restore (output_space native
    vs model); job time (load + read + edit + compose + write) and peak RSS;
(b) decoding the largest latent the bundle could have, that of a 1 mm 184×220×184 model grid (182×218×182 rounded up
    to the autoencoder's factor 4: latent 3×46×55×46), whole vs in windows of the autoencoder's training patch
    (monai_ld.networks.tiling): time, peak RSS, max |tiled − whole|; if the whole decode passes --mem-limit-gb it is
    stopped and the next smaller grid is used (said in the output);
(c) cohort throughput (monai_ld.cohort, a CSV --input-list of 8 bundled 64³ phantoms with their attributes): seconds
    per image at batch 1 vs batch 8.

Every case runs in a fresh subprocess (one case per process, so peaks do not mix; the child reports its own
``ru_maxrss``, the parent polls RSS only to stop a case above the limit). Figures are medians over --repeats.

    python benchmarks/bench_native.py --threads 1            # the full run (few DDIM steps: --steps 5)
    python benchmarks/bench_native.py --quick                # smoke run: small grids, 2 steps, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "bundles" / "brain_mri_counterfactual"
SAMPLE = BUNDLE / "sample_data" / "sample.json"


# -- children: one case each, result as the last stdout line ------------------------------------------------------------
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _case_counterfactual(a: dict) -> dict:
    from monai_ld.pipeline import CounterfactualPipeline

    sample = json.loads(SAMPLE.read_text())
    t0 = time.perf_counter()
    pipe = CounterfactualPipeline.from_checkpoint(a["checkpoint"])
    pipe.run_to_dir(a["input"], a["out"], target=sample["target"], source=sample["source"], overwrite=True,
                    num_inference_steps=a["steps"], output_space=a["space"])
    return {"seconds": time.perf_counter() - t0}


def _case_encode(a: dict) -> dict:
    """The 1 mm model grid of the input through the bundle's autoencoder (tiled: it is the bounded-memory path)."""
    import torch

    from monai_ld.networks.model import ConditionalLDM
    from monai_ld.networks.tiling import tile_autoencoder
    from monai_ld.transforms.chains import build_chain

    model = ConditionalLDM.load(a["checkpoint"])
    ae = tile_autoencoder(model, a["checkpoint"], threshold=0)
    prep = {**model.meta["preprocessing"], "spatial_size": a["grid"], "pixdim": [a["mm"]] * 3}
    x = build_chain(prep)({"image": a["input"]})["image"][None].float().as_tensor()
    t0 = time.perf_counter()
    with torch.no_grad():
        z = ae.encode(x)[0]
    torch.save(z, a["latent"])
    return {"seconds": time.perf_counter() - t0, "latent": list(z.shape), "windows": ae.windows,
            "window": list(ae.window), "window_source": ae.window_source}


def _case_decode(a: dict) -> dict:
    import numpy as np
    import torch

    from monai_ld.networks.model import ConditionalLDM
    from monai_ld.networks.tiling import tile_autoencoder

    model = ConditionalLDM.load(a["checkpoint"])
    ae = tile_autoencoder(model, a["checkpoint"], threshold=0 if a["tiled"] else float("inf"))
    z = torch.load(a["latent"], weights_only=True)
    base = _peak_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        y = ae.decode(z)
    sec = time.perf_counter() - t0
    np.save(a["out"], y[0, 0].numpy())
    return {"seconds": sec, "rss_before_mb": base, "windows": ae.windows, "window": list(ae.window or [])}


def _case_cohort(a: dict) -> dict:
    from monai_ld.cohort import run_cohort
    from monai_ld.pipeline import CounterfactualPipeline

    pipe = CounterfactualPipeline.from_checkpoint(a["checkpoint"])
    t0 = time.perf_counter()
    rows, failed = run_cohort(pipe, a["csv"], a["out"], {"diagnosis": "AD"}, overwrite=True, progress=False,
                              batch_size=a["batch"], num_inference_steps=a["steps"])
    if failed:
        raise RuntimeError(f"{failed} cohort rows failed: {[r.get('error') for r in rows if r['status'] == 'failed']}")
    return {"seconds": time.perf_counter() - t0, "images": len(rows)}


CASES = {"counterfactual": _case_counterfactual, "encode": _case_encode, "decode": _case_decode, "cohort": _case_cohort}


def _child(name: str, args: dict) -> None:
    import torch

    torch.set_num_threads(int(args["threads"]))
    out = CASES[name](args)
    print(json.dumps({**out, "peak_rss_mb": _peak_mb()}), flush=True)


# -- parent ---------------------------------------------------------------------------------------------------------
class OverLimit(RuntimeError):
    pass


def run_case(name: str, args: dict, limit_gb: float) -> dict:
    """``name`` in a fresh interpreter; stopped (``OverLimit``) when its RSS passes ``limit_gb``."""
    import psutil

    env = {**os.environ, **{k: str(args["threads"]) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", name, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    ps, over = psutil.Process(proc.pid), False
    while proc.poll() is None:
        try:
            if ps.memory_info().rss > limit_gb * 2**30:
                over = True
                proc.kill()
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    if over:
        raise OverLimit(f"{name} passed {limit_gb} GB")
    if proc.returncode:
        raise RuntimeError(f"case {name} failed:\n{err[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "wall": time.perf_counter() - t0}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def make_input(path: Path, shape: tuple[int, int, int], mm: float) -> Path:
    """The bundled 2.875 mm phantom on a ``shape`` grid of ``mm`` voxels (RAS, centred on the phantom), int16."""
    import nibabel as nib
    import numpy as np
    from nibabel.processing import resample_from_to

    src = nib.load(BUNDLE / "sample_data" / json.loads(SAMPLE.read_text())["input"])
    centre = src.affine @ np.array([*(np.array(src.shape) - 1) / 2.0, 1.0])
    aff = np.diag([mm, mm, mm, 1.0])
    aff[:3, 3] = centre[:3] - mm * (np.array(shape) - 1) / 2.0
    img = resample_from_to(src, (shape, aff), order=1)
    nib.save(nib.Nifti1Image(np.round(np.asarray(img.dataobj) * 1000).astype(np.int16), aff), path)
    return path


def make_cohort(root: Path, n: int) -> Path:
    """A CSV input list of ``n`` bundled phantoms (test split first) with their attributes as each row's source."""
    import csv

    with open(BUNDLE / "data" / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["counterfactual_of"]]
    rows = sorted(rows, key=lambda r: r["split"] != "test")[:n]
    out = root / "cohort.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "age", "sex", "diagnosis"])
        for r in rows:
            w.writerow([str(BUNDLE / "data" / r["path"]), r["age"], r["sex"], r["diagnosis"]])
    return out


def _bar(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 mm grids, 2 steps, 2 cohort inputs, 1 repeat")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per case (the bar is for 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps per counterfactual (default 5; quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="runs per case, medians reported (default 3; quick 1)")
    p.add_argument("--decode-repeats", type=int, default=None, help="runs per decode case in (b) (default: --repeats)")
    p.add_argument("--mem-limit-gb", type=float, default=7.5, help="stop a case above this RSS (default 7.5)")
    p.add_argument("--parts", default="abc", help="which parts to run: a (1 mm counterfactual), b (decode), c (cohort)")
    p.add_argument("--checkpoint", default=str(BUNDLE / "models" / "model.pt"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.child[0], json.loads(a.child[1]))
        return 0
    steps = a.steps or (2 if a.quick else 5)
    reps = a.repeats or (1 if a.quick else 3)
    dec_reps = a.decode_repeats or reps
    mm, shape = (2.0, (91, 109, 91)) if a.quick else (1.0, (182, 218, 182))
    n_cohort, big_batch = (2, 2) if a.quick else (8, 8)
    common = {"checkpoint": a.checkpoint, "threads": a.threads}
    t_start = time.perf_counter()
    print(f"bench_native: brain bundle {Path(a.checkpoint).relative_to(ROOT) if ROOT in Path(a.checkpoint).parents else a.checkpoint}, "
          f"{a.threads} torch thread(s), {steps} DDIM steps, median of {reps} run(s) per case, one fresh process per run"
          f"{' (QUICK smoke run: small grids, not the issue bars)' if a.quick else ''}")
    with tempfile.TemporaryDirectory(prefix="bench_native_") as tmp:
        root = Path(tmp)
        src = make_input(root / "t1.nii.gz", shape, mm)
        print(f"input: {src.name} {shape[0]}×{shape[1]}×{shape[2]} at {mm:g} mm, int16 ({src.stat().st_size / 2**20:.1f} MB)")

        # (a) ---------------------------------------------------------------------------------------------------
        if "a" in a.parts:
            res = {}
            for space in ("native", "model"):
                res[space] = [run_case("counterfactual", {**common, "input": str(src), "out": str(root / f"cf_{space}_{i}"),
                                                          "steps": steps, "space": space}, a.mem_limit_gb) for i in range(reps)]
            print(f"\n(a) {mm:g} mm counterfactual ({steps} steps; job = load + read + edit + compose + write)")
            print(f"    {'output space':<34}{'job s':>8}{'process s':>11}{'peak RSS GB':>13}")
            for space, label in (("native", "native (input + Δ, 1 mm)"), ("model", "model (whole output restored)")):
                r = res[space]
                print(f"    {label:<34}{median(r, 'seconds'):>8.1f}{median(r, 'wall'):>11.1f}{median(r, 'peak_rss_mb') / 1024:>13.2f}")
            nat = res["native"]
            print(f"    bar: ≤ 6 GB peak RSS and ≤ 3 min on 2 cores -> native {median(nat, 'peak_rss_mb') / 1024:.2f} GB, "
                  f"{median(nat, 'seconds'):.0f} s on {a.threads} thread(s): "
                  f"{_bar(median(nat, 'peak_rss_mb') <= 6 * 1024 and median(nat, 'seconds') <= 180)}")

        # (b) ---------------------------------------------------------------------------------------------------
        if "b" in a.parts:
            import numpy as np

            grid = [int(-(-s // 4) * 4) for s in shape]  # up to the autoencoder's factor
            note = ""
            while True:
                latent = root / "latent.pt"
                enc = run_case("encode", {**common, "input": str(src), "grid": grid, "mm": mm, "latent": str(latent)},
                               a.mem_limit_gb)
                try:
                    whole = [run_case("decode", {**common, "latent": str(latent), "tiled": False, "out": str(root / "whole.npy")},
                                      a.mem_limit_gb)]
                    break
                except OverLimit:
                    smaller = [int(s * 0.85) // 4 * 4 for s in grid]
                    note = f" (the {'×'.join(map(str, grid))} grid's whole decode passed {a.mem_limit_gb} GB; "
                    grid = smaller
                    note += f"largest tried that fits: {'×'.join(map(str, grid))})"
            whole += [run_case("decode", {**common, "latent": str(latent), "tiled": False, "out": str(root / "whole.npy")},
                               a.mem_limit_gb) for _ in range(dec_reps - 1)]
            tiled = [run_case("decode", {**common, "latent": str(latent), "tiled": True, "out": str(root / "tiled.npy")},
                              a.mem_limit_gb) for _ in range(dec_reps)]
            y_whole, y_tiled = np.load(root / "whole.npy"), np.load(root / "tiled.npy")
            diff = np.abs(y_tiled - y_whole)
            print(f"\n(b) decode (median of {dec_reps} run(s)) of the latent {'×'.join(map(str, enc['latent'][1:]))} of a {mm:g} mm "
                  f"{'×'.join(map(str, grid))} grid{note}")
            print(f"    (latent: tiled encode, {enc['windows']} windows, {enc['seconds']:.1f} s, peak RSS "
                  f"{enc['peak_rss_mb'] / 1024:.2f} GB; window {'×'.join(map(str, enc['window']))} image voxels from "
                  f"{enc['window_source']}, overlap 0.25, gaussian blending)")
            print(f"    {'decode':<34}{'s':>8}{'windows':>11}{'peak RSS GB':>13}")
            for label, r in (("whole volume", whole), ("tiled", tiled)):
                print(f"    {label:<34}{median(r, 'seconds'):>8.1f}{r[0]['windows']:>11}{median(r, 'peak_rss_mb') / 1024:>13.2f}")
            print(f"    max |tiled − whole| = {diff.max():.4f}, mean {diff.mean():.4f} (whole output range "
                  f"{y_whole.min():.3f}..{y_whole.max():.3f}; the two differ by GroupNorm window statistics, not only seams)")
            print(f"    bar: tiled decode peak memory below untiled -> {median(tiled, 'peak_rss_mb') / 1024:.2f} GB vs "
                  f"{median(whole, 'peak_rss_mb') / 1024:.2f} GB: {_bar(median(tiled, 'peak_rss_mb') < median(whole, 'peak_rss_mb'))}")

        # (c) ---------------------------------------------------------------------------------------------------
        if "c" in a.parts:
            csv_path = make_cohort(root, n_cohort)
            coh = {b: [run_case("cohort", {**common, "csv": str(csv_path), "out": str(root / f"cohort_{b}_{i}"), "batch": b,
                                           "steps": steps}, a.mem_limit_gb) for i in range(reps)] for b in (1, big_batch)}
            per = {b: median(r, "seconds") / n_cohort for b, r in coh.items()}
            print(f"\n(c) cohort of {n_cohort} bundled 64³ phantoms (--input-list CSV, {steps} steps; s per image = cohort "
                  f"time / {n_cohort}, model load excluded)")
            print(f"    {'batch size':<34}{'s/image':>8}{'':>11}{'peak RSS GB':>13}")
            for b, r in coh.items():
                print(f"    {b:<34}{per[b]:>8.2f}{'':>11}{median(r, 'peak_rss_mb') / 1024:>13.2f}")
            speed = per[1] / per[big_batch]
            print(f"    bar: batched throughput ≥ 1.5× per image vs batch 1 -> {speed:.2f}×: {_bar(speed >= 1.5)}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
