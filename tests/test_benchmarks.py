"""The GPU session kit runs end to end on the CPU (tiny settings), so a session lent a GPU never finds it broken.

Timings are printed by these scripts, never asserted; what is asserted is that every case runs and that the
bit-identity checks they print hold.
"""

import sys

import pytest

from comfy_host import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


@pytest.fixture
def no_progress_bars(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def test_sampling_benchmark_times_every_variant_and_finds_them_bit_identical(host, capsys, no_progress_bars):
    import sampling_overhead

    assert sampling_overhead.main(["--size", "64", "--steps", "1", "--rounds", "1", "--straightforward", "--decompose",
                                   "--graphs", "--device-skip", "--check", "--breakdown"]) == 0
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
    assert "fastest exact variant: mid: " in out and "; all: " in out
    breakdown = out[out.index("breakdown ("):]
    assert "us x 50) + attention" in breakdown and "us x 70) + attention" in breakdown  # one model call per run
    assert "cuda-graph gate mid: 100 graph, 0 eager" in out  # 50 layers, 2 model calls (1 step, cfg batched)


def test_cuda_check_passes_its_dry_run_on_the_cpu(host, capsys, no_progress_bars):
    import cuda_check

    assert cuda_check.main(["--cpu"]) == 0
    out = capsys.readouterr().out
    assert "cuda_check: 0 failed" in out and "device-skip CUDA-graph gate, mixed gates" in out
