"""The two test tiers: the pure tier is collected where no ComfyUI can be found, and holds no test that needs one."""

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_pure_tier_is_collected_without_comfyui_and_the_host_tests_are_left_out(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path))  # an empty folder: no ComfyUI to find, none on sys.path
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "not host", "--collect-only", "-q",
                           "-p", "no:cacheprovider", str(TESTS)],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = {line.split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    counts = re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", done.stdout)
    assert counts and int(counts.group(3)) > 0 and int(counts.group(1)) > 0, done.stdout[-1000:]
    for pure in ("tests/test_gate_math.py::test_gate_head_matches_float64_reference",
                 "tests/test_harness.py::test_pack_registered_without_running_init",
                 "tests/test_train_cli.py::test_dataset_without_images"):
        assert pure in collected, pure
    # by the `host` fixture, through another fixture (sdxl_clip), by the `server` marker, by running a tool
    for host in ("tests/test_harness.py::test_host_is_loaded_on_cpu",
                 "tests/test_region_gates.py::test_phrases_map_to_their_tokens_in_both_sdxl_encoders",
                 "tests/test_server.py::test_pack_nodes_in_object_info",
                 "tests/test_train_cli.py::test_run_checkpoints_and_resumes_bit_for_bit"):
        assert host not in collected, host
