#!/usr/bin/env bash
# Create ./.venv and install monai_ld into it with the pinned versions (CPU torch, offline-capable afterwards).
# Usage: bash scripts/install.sh [EXTRAS]   e.g. bash scripts/install.sh test   or   bash scripts/install.sh test,label
# The `label` extra adds MONAI Label 0.8.5 (3D Slicer server: `monai-ld label-server`, docs/monai_label.md).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
# `label` is not a pip extra (MONAI Label's declared dependencies break this stack; see below): take it out
label=0
pip_extras=()
IFS=',' read -r -a _words <<< "$extras"
for w in "${_words[@]}"; do
  w="${w// /}"
  if [ "$w" = "label" ]; then label=1; elif [ -n "$w" ]; then pip_extras+=("$w"); fi
done
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt torch==2.13.0
if [ ${#pip_extras[@]} -gt 0 ]; then spec=".[$(IFS=','; echo "${pip_extras[*]}")]"; else spec="."; fi
python -m pip install -q -c constraints.txt -e "$spec"
if [ "$label" = 1 ]; then
  # MONAI Label without its declared dependencies (they pull a CUDA torchvision that breaks `import diffusers`,
  # pydicom 3 with which MONAILabelApp fails to import, and numpy<2), then exactly what it needs, pinned.
  python -m pip install -q --no-deps -c constraints.txt -c constraints-label.txt monailabel pydicom-seg
  python -m pip install -q -c constraints.txt -c constraints-label.txt \
    pydicom pynetdicom "dicomweb-client[gcp]" itk fastapi uvicorn pydantic-settings python-multipart \
    requests-toolbelt cachetools expiring-dict schedule timeloop watchdog PyJWT passlib pynrrd girder-client psutil
  # smoke check: the app imports, and diffusers (when installed) still does
  python -c "import importlib.util as u, monai_ld.label.application; u.find_spec('diffusers') and __import__('diffusers')"
fi
echo "monai_ld installed in $(pwd)/.venv${extras:+ (extras: $extras)}"
