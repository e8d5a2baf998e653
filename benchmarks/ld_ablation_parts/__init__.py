"""Parts of ``benchmarks/ld_ablation.py`` (issue #14): target domain, per-cell measurements, report."""
