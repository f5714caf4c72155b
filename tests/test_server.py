"""The pack in a real ComfyUI server: its nodes are served and it imported cleanly."""

import re

import comfy_host
import pytest

pytestmark = pytest.mark.server

PACK_NODE_IDS = ("MaskAttnLoadGates", "MaskAttnApply", "MaskAttnSaveGates")

# The host's own optional extras (comfy_extras/*.py) may fail for missing optional deps (spandrel and
# torchaudio on the new host); those lines are tolerated, any other import failure is not.
_FAILURE = re.compile(r"IMPORT FAILED|Cannot import")
_HOST_EXTRA = re.compile(r"comfy_extras|^IMPORT FAILED: nodes_\w+\.py$")


def import_failures(log_text):
    """Log lines that report a failed import of anything but the host's own comfy_extras."""
    return [line for line in log_text.splitlines() if _FAILURE.search(line) and not _HOST_EXTRA.search(line.strip())]


def test_import_failures_filter():
    log = "\n".join(
        [
            "Cannot import /x/comfyui/comfy_extras/nodes_audio.py module for custom nodes: No module named 'av'",
            "IMPORT FAILED: nodes_audio.py",
            "   0.0 seconds: /x/comfyui/custom_nodes/comfyui-maskattn",
            "Cannot import /x/comfyui/custom_nodes/comfyui-maskattn module for custom nodes: No module named 'y'",
            "   0.0 seconds (IMPORT FAILED): /x/comfyui/custom_nodes/comfyui-maskattn",
        ]
    )
    assert import_failures(log) == log.splitlines()[3:]


def test_pack_nodes_in_object_info(tmp_path):
    proc, base_url, log_path = comfy_host.start_server(tmp_path)
    try:
        info = comfy_host.get_json(base_url, "/object_info")
    finally:
        comfy_host.stop_server(proc)
    log = log_path.read_text(errors="replace")
    tail = log[-6000:]

    assert not import_failures(log), tail
    assert f"custom_nodes/{comfy_host.PACK_FOLDER}" in log, tail  # the host did load the pack folder
    missing = [node_id for node_id in PACK_NODE_IDS if node_id not in info]
    assert not missing, f"missing from /object_info: {missing}\n{tail}"
    for node_id in PACK_NODE_IDS:
        node = info[node_id]
        assert node["name"] == node_id
        assert "input" in node and "output" in node
        if "python_module" in node:  # new hosts say where a node came from
            assert comfy_host.PACK_FOLDER in node["python_module"], node["python_module"]
