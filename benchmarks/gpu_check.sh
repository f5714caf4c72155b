#!/usr/bin/env bash
# The device check for a session that is lent a GPU (issue 5), prepared to run once:
#   bash benchmarks/gpu_check.sh OUT_DIR [HOST ...]
# HOST: ComfyUI folders to measure (default: as cli/host.py finds one). The first gets the full sampling table
# (decomposition, the opt-in CUDA-graph and device-skip gates and both together, bit-identity check, and the
# device time per case: the floor each case would reach if its host side were free), which names the fastest exact
# variant overall (picked.txt); then every host samples with that variant as the default (MASKATTN_CUDA_GATE, as a
# user would set it) against the spec path (confirm_*.txt). Make it the pack's default (nodes/executor.py,
# CUDA_GATE_DEFAULT) if it meets the goal.
# (--sync-free and --low-precision-gate were measured on 2026-11-26; see docs/SPEED.md.)
# Needs torch with CUDA and the hosts' import deps: benchmarks/prepare_device.sh packs what a bare GPU image lacks.
# Took 8 min on an H100 with two hosts (2026-11-26), with the training step, which now runs only with
# GPU_CHECK_TRAIN=1. GPU_CHECK_MODE=confirm: the default (or $MASKATTN_CUDA_GATE) alone against the spec path on
# every host (a few minutes). GPU_CHECK_DRY=1: the same steps on the CPU at tiny settings (tests/test_benchmarks.py).
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
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
    | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || hosts=("")
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then  # the script's own test, on the CPU: tiny model, one round
    model=(--size 64 --steps 1) full_rounds=1 confirm_rounds=1 cuda=(--cpu --quick)
else
    model=(--sdxl-size --steps 8) full_rounds=7 confirm_rounds=5 cuda=()
fi
variant="${MASKATTN_CUDA_GATE:-}"  # confirm mode: the variant to confirm (unset: the pack's default)
first=1
for host in "${hosts[@]}"; do
    tag=$(basename "${host:-default}")
    export COMFYUI_PATH="$host"
    [ -n "$host" ] || unset COMFYUI_PATH
    timeout 150 python benchmarks/cuda_check.py "${cuda[@]}" 2>&1 | quiet | tee "$out/cuda_check_$tag.txt"
    if [ "$mode" != confirm ] && [ $first = 1 ]; then
        # every exact variant timed and checked against the spec path; the fastest overall is then confirmed as
        # the default ($MASKATTN_CUDA_GATE) on every host, in this same call
        timeout 300 python benchmarks/sampling_overhead.py "${model[@]}" --rounds $full_rounds --straightforward \
            --decompose --graphs --device-skip --check --device-time 2>&1 | quiet | tee "$out/sampling_$tag.txt"
        variant=$(sed -n 's/^fastest exact variant overall: \([^ ]*\).*/\1/p' "$out/sampling_$tag.txt")
        echo "picked for the CUDA default: ${variant:-none (the table did not finish)}" | tee "$out/picked.txt"
        [ -n "$variant" ] || break
        if [ "$variant" = eager ]; then first=0; continue; fi  # the table above measured it as the default already
    fi
    # the default, as install sets it from $MASKATTN_CUDA_GATE, against the spec path, bit for bit
    MASKATTN_CUDA_GATE="$variant" timeout 180 python benchmarks/sampling_overhead.py "${model[@]}" \
        --rounds $confirm_rounds --straightforward --check 2>&1 | quiet | tee "$out/confirm_$tag.txt"
    first=0
done
if [ "${GPU_CHECK_TRAIN:-0}" = 1 ]; then  # (measured on 2026-11-26: docs/SPEED.md; not part of the sampling goal)
    timeout 150 python benchmarks/train_step.py --sdxl-size 2>&1 | quiet | tee "$out/train_step.txt"
fi
echo "done: $out"
