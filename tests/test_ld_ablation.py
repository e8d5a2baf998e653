"""The LD ablation benchmark (issue #14) runs its whole grid at toy size and writes a complete, finite report."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ld_ablation_parts import report  # noqa: E402


def test_paired_interval_and_verdict():
    d = report.paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert d["per_seed"] == [1.0, 2.0, 3.0] and d["mean"] == 2.0
    lo, hi = d["ci95"]
    assert math.isclose(hi - 2.0, 4.302652729911275 * 1.0 / math.sqrt(3), rel_tol=1e-9) and math.isclose(lo + hi, 4.0)
    assert report.verdict(d, "fid") == "no significant change"  # [-0.48, 4.48] holds 0
    tight = report.paired([1.0, 1.1, 0.9], [0.0, 0.0, 0.0])
    assert report.verdict(tight, "fid") == "worse" and report.verdict(tight, "auc") == "better"
    assert report.verdict(report.paired([1.0, -1.0, 0.5], [0.0, 0.0, 0.0]), "kid") == "no significant change"


def test_quick_run_writes_every_cell(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks/ld_ablation.py"), "--quick", "--out-dir", str(tmp_path),
                    "--work-dir", str(tmp_path / "work")], check=True, env=env, cwd=ROOT, capture_output=True)
    result = json.loads((tmp_path / "ld_ablation.json").read_text())
    expected = {"base/off", "base/sample"} | {f"{s}/{a}" for s in report.SCHEMES for a in report.LD_ARMS}
    assert set(result["cells"]) == expected
    for name, seeds in result["cells"].items():
        assert len(seeds) >= 3, name
        for metrics in seeds.values():
            for m in report.METRICS:
                assert math.isfinite(metrics[m]), (name, m)
        for m in report.METRICS:
            assert math.isfinite(result["summary"]["cells"][name][m]["mean"])
    diffs = result["summary"]["paired_differences"]
    assert set(diffs) == {"base/sample"} | {f"{s}/{a}" for s in report.SCHEMES for a in ("train", "train+sample")}
    for d in diffs.values():
        assert all(len(d[m]["per_seed"]) >= 3 and len(d[m]["ci95"]) == 2 for m in report.METRICS)
    for scheme in report.SCHEMES:  # δ from the paper's grid, searched on val
        assert {"training", "sampling"} <= set(result["chosen_drift"][scheme])
        assert result["chosen_drift"][scheme]["training"] in result["config"]["drifts"]
    assert result["domain_shift"]["source_vs_target"]["fid"] >= 0 and result["wall_time_s"] > 0
    md = (tmp_path / "ld_ablation.md").read_text()
    assert "Paired difference" in md and "base" in md and (tmp_path / "images/ld_ablation.png").stat().st_size > 10_000
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").glob("*.pt"))  # checkpoints cleaned up
