"""Shared test setup: the pack is importable as `comfyui_maskattn`; `host` loads ComfyUI (CPU).

Two tiers. A test is marked `host` (it needs a real ComfyUI) when it uses the `host` fixture, directly or through
another fixture, when it starts a server (`server` marker), or when it runs a pack tool that loads ComfyUI itself
(listed in HOST_TOOL_TESTS). Every other test is pure: `python -m pytest -m "not host" tests`
runs them where no ComfyUI is installed (importing this file or tests/comfy_host.py never imports ComfyUI).
"""

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import comfy_host  # noqa: E402

comfy_host.register_pack()

# Tests that need ComfyUI without asking for the `host` fixture: they run cli.train past its dataset check (in a
# subprocess or in this process), where it loads the host itself (module file name -> test function names).
HOST_TOOL_TESTS = {
    "test_train_cli.py": {
        "test_run_checkpoints_and_resumes_bit_for_bit",
        "test_torchrun_ddp_two_cpu_processes",
        "test_empty_mask_and_mask_steps_without_masks",
        "test_mask_supervised_run_then_objective",
    },
}


def needs_host(item) -> bool:
    """True when `item` needs a ComfyUI install (see the module docstring)."""
    if "host" in getattr(item, "fixturenames", ()) or item.get_closest_marker("server") is not None:
        return True
    name = getattr(item, "originalname", None) or item.name
    return name in HOST_TOOL_TESTS.get(item.path.name, ())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_host(item):
            item.add_marker(pytest.mark.host)


@pytest.fixture(scope="session")
def host():
    """The `comfy_host` module after `load_host()`: ComfyUI imported on the CPU."""
    comfy_host.load_host()
    return comfy_host
