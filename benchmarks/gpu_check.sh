#!/usr/bin/env bash
# The device check for a session that is lent a GPU (issue 5), prepared to run once:
#   bash benchmarks/gpu_check.sh OUT_DIR [HOST ...]
# HOST: ComfyUI folders to measure (default: as cli/host.py finds one). The first gets the full sampling table
# (decomposition, the opt-in CUDA-graph and device-skip gates and both together, bit-identity check, and the
# device time per case: the floor each case would reach if its host side were free); the others the main cases.
# (--sync-free and --low-precision-gate were measured on 2026-11-26; see README, Speed.)
# Needs torch with CUDA and the hosts' import deps: benchmarks/prepare_device.sh packs what a bare GPU image lacks.
# Took 8 min on an H100 with two hosts (2026-11-26), with the training step, which now runs only with
# GPU_CHECK_TRAIN=1. GPU_CHECK_MODE=confirm: after the default changed, the default alone against the spec path on
# every host (a few minutes), so one session can measure, change the default and confirm it.
# --flip-rate and --count-ops are left out (slow under CUDA).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-gpu_check_out}}"
shift || true
mkdir -p "$out"
mode="${GPU_CHECK_MODE:-full}"
# No progress bars: a warning logged mid-sampling lands on the bar's line, and filtering the bars dropped it once.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MASKATTN_TEST_THREADS="${MASKATTN_TEST_THREADS:-8}"
quiet() { tr '\r' '\n' | sed -E 's/^.*(it\/s|s\/it)\]//' | grep -v -e '^[[:space:]]*$' -e "Requested to load" \
    -e "Loading 1 new model" -e "loaded completely" -e "USDT:"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || hosts=("")
first=1
for host in "${hosts[@]}"; do
    tag=$(basename "${host:-default}")
    export COMFYUI_PATH="$host"
    [ -n "$host" ] || unset COMFYUI_PATH
    timeout 180 python benchmarks/cuda_check.py 2>&1 | quiet | tee "$out/cuda_check_$tag.txt"
    if [ "$mode" = confirm ]; then  # after changing the default: the default against the spec path, bit for bit
        flags=(--steps 8 --rounds 5 --straightforward --check)
    elif [ $first = 1 ]; then
        flags=(--steps 8 --rounds 7 --straightforward --decompose --graphs --device-skip --check --device-time)
    else
        flags=(--steps 8 --rounds 5 --straightforward --graphs --device-skip --check)
    fi
    timeout 300 python benchmarks/sampling_overhead.py --sdxl-size "${flags[@]}" 2>&1 | quiet \
        | tee "$out/sampling_$tag.txt"
    first=0
done
if [ "${GPU_CHECK_TRAIN:-0}" = 1 ]; then  # (measured on 2026-11-26: README, Speed; not part of the sampling goal)
    timeout 150 python benchmarks/train_step.py --sdxl-size 2>&1 | quiet | tee "$out/train_step.txt"
fi
echo "done: $out"
