#!/usr/bin/env bash
# Create ./.venv and install monai_ld into it with the pinned versions (CPU torch, offline-capable afterwards).
# Usage: bash scripts/install.sh [EXTRAS]   e.g. bash scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt torch==2.13.0
if [ -n "$extras" ]; then spec=".[$extras]"; else spec="."; fi
python -m pip install -q -c constraints.txt -e "$spec"
echo "monai_ld installed in $(pwd)/.venv"
