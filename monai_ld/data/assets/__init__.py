"""Package data: derived phantom assets (see ATTRIBUTION.md and scripts/make_phantom_assets.py)."""
