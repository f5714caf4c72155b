#!/usr/bin/env bash
# Quickstart: set up (cli/install_host.sh) and run the main example workflow headless on the embedded ComfyUI.
#   bash cli/quickstart.sh                      # tiny random model (no checkpoint needed): checks everything works
#   bash cli/quickstart.sh --steps 1 --size 64  # its smallest settings
#   bash cli/quickstart.sh --comfyui ~/ComfyUI --checkpoint sd_xl_base_1.0.safetensors   # your ComfyUI and SDXL
# Arguments go to `python -m cli.run_example`; without --checkpoint it runs --smoke. The image and the gate grid
# are written to ~/maskattn_output (or --out DIR) and their paths printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

bash cli/install_host.sh
case " $* " in
    *" --checkpoint "*|*" --checkpoint="*|*" --smoke "*) ;;
    *) set -- --smoke "$@" ;;  # (not an array: an empty one is an error under `set -u` in bash 3.2, macOS's)
esac
exec "$PY" -m cli.run_example "$@"
