"""The GPU session kit runs end to end on the CPU (tiny settings), so a session lent a GPU never finds it broken.

Timings are printed by these scripts, never asserted; what is asserted is that every case runs and that the
bit-identity checks they print hold.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_host import HOST_PATH, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


@pytest.fixture
def no_progress_bars(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def test_sampling_benchmark_times_every_variant_and_finds_them_bit_identical(host, capsys, no_progress_bars):
    import sampling_overhead
    from comfyui_maskattn.nodes.executor import CUDA_GATE_VARIANTS

    assert sampling_overhead.main(["--size", "64", "--steps", "1", "--rounds", "1", "--straightforward", "--decompose",
                                   "--graphs", "--device-skip", "--check", "--breakdown", "--device-time"]) == 0
    out = capsys.readouterr().out
    header = out.index("paired")
    for stage in ("mid", "all"):
        for case in ("hook only", "mask only", "cuda-graph gate", "device-skip", "cuda-graph device-skip",
                     "straightforward"):
            assert f"  {case} {stage} " in out[header:]
        for variant in ("fast", "cuda graph", "device skip", "cuda graph device skip"):
            assert f"  {stage} {variant} vs straightforward: bit-identical" in out
        for variant in ("hook only", "mask only"):
            assert f"  {stage} {variant} vs untouched: bit-identical" in out
    assert "non-finite latents: none" in out
    for stage in ("mid", "all"):  # the context gates' cost is timed beside v2's
        assert f"zero-shot v2 {stage} (" in out[header:] and f"learned context {stage} (" in out[header:]
    assert "fastest exact variant: mid: " in out and "; all: " in out
    overall = out[out.index("fastest exact variant overall: "):].split(": ", 1)[1].split()[0]
    assert overall in CUDA_GATE_VARIANTS
    breakdown = out[out.index("breakdown ("):]
    assert "us x 50) + attention" in breakdown and "us x 70) + attention" in breakdown  # one model call per run
    assert "cuda-graph gate mid: 100 graph, 0 eager" in out  # 50 layers, 2 model calls (1 step, cfg batched)
    device = out[out.index("device time ("):out.index("breakdown (")]
    ops = {line.split("  ")[1].strip(): float(line.split()[-3]) for line in device.splitlines()[2:]}
    assert "straightforward mid" not in ops and len(ops) == 13
    for stage in ("mid", "all"):  # the profiled runs see the gate's operators
        gated = next(v for k, v in ops.items() if k.startswith(f"maskattn {stage}"))
        assert gated > ops[f"hook only {stage}"] and ops[f"mask only {stage}"] >= ops[f"hook only {stage}"]


def test_busy_time_counts_overlapping_and_nested_spans_once():
    from timing import busy_time

    assert busy_time([]) == 0.0
    assert busy_time([(5, 6), (0, 2), (1, 3), (5.5, 5.7)]) == 4.0  # [0, 3] and [5, 6]
    assert busy_time([(0, 10), (2, 3), (4, 12)]) == 12.0


def test_cuda_check_passes_its_dry_run_on_the_cpu(host, capsys, no_progress_bars):
    import cuda_check

    assert cuda_check.main(["--cpu"]) == 0
    out = capsys.readouterr().out
    assert "cuda_check: 0 failed" in out and "device-skip CUDA-graph gate, mixed gates" in out
    assert "CUDA-graph gate, a head per layer == straightforward path" in out


def test_the_gpu_script_measures_picks_a_variant_and_confirms_it_on_every_host(host, tmp_path):
    """benchmarks/gpu_check.sh's own dry run (GPU_CHECK_DRY=1: the CPU, tiny settings), with two hosts as a GPU
    session passes them: the first gets the full table and the pick, every later one the confirmation."""
    from comfyui_maskattn.nodes.executor import CUDA_GATE_VARIANTS

    second = tmp_path / "second"
    second.symlink_to(HOST_PATH)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MASKATTN_CUDA_GATE", "GPU_CHECK_MODE")}
    env.update(GPU_CHECK_DRY="1", MASKATTN_TEST_THREADS="1")
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(out), str(HOST_PATH),
                           str(second)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and f"done: {out}" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    first = Path(HOST_PATH).name
    for tag in (first, "second"):
        assert "cuda_check: 0 failed" in (out / f"cuda_check_{tag}.txt").read_text()
    table = (out / f"sampling_{first}.txt").read_text()
    for stage in ("mid", "all"):
        for variant in ("fast", "cuda graph", "device skip", "cuda graph device skip"):
            assert f"  {stage} {variant} vs straightforward: bit-identical" in table
    picked = (out / "picked.txt").read_text().split(": ", 1)[1].strip()
    assert picked in CUDA_GATE_VARIANTS
    assert f"fastest exact variant overall: {picked} " in table
    confirm = (out / "confirm_second.txt").read_text()
    for stage in ("mid", "all"):
        assert f"  {stage} fast vs straightforward: bit-identical" in confirm
