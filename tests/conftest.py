"""Shared test setup: the pack is importable as `comfyui_maskattn`; `host` loads ComfyUI (CPU)."""

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import comfy_host  # noqa: E402

comfy_host.register_pack()


@pytest.fixture(scope="session")
def host():
    """The `comfy_host` module after `load_host()`: ComfyUI imported on the CPU."""
    comfy_host.load_host()
    return comfy_host
