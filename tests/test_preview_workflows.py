"""The example workflows: current with tests/workflow_build.py, both formats agree, every node exists in stock
ComfyUI or this pack with valid widget values; and the headless example command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import workflow_build

REPO = Path(__file__).resolve().parent.parent


def test_workflow_files_are_what_the_builder_writes():
    built = workflow_build.build()
    on_disk = {p.name for p in (REPO / "workflows").glob("*.json")}
    assert set(built) <= on_disk
    for name, data in built.items():
        assert (REPO / "workflows" / name).read_text() == workflow_build.dumps(data), (
            f"workflows/{name} is stale: run `python tests/workflow_build.py`")


@pytest.mark.parametrize("name", ["maskattn_sdxl_viewer", "maskattn_sdxl_compare"])
def test_ui_and_api_formats_agree_and_every_node_exists(host, name):
    import nodes as comfy_nodes

    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS as pack

    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    api = json.loads((REPO / "workflows" / f"{name}_api.json").read_text())
    known = {**comfy_nodes.NODE_CLASS_MAPPINGS, **pack}
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    links = {lk[0]: lk for lk in ui["links"]}
    for node in ui["nodes"]:
        cls = known.get(node["type"])
        assert cls is not None, f"{name}: {node['type']} is neither stock ComfyUI nor this pack"
        spec = cls.INPUT_TYPES()
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        api_inputs = api[str(node["id"])]["inputs"]
        for socket in node["inputs"]:  # links agree
            if socket["link"] is not None:
                _, src, slot, dst, _, kind = links[socket["link"]]
                assert dst == node["id"] and api_inputs[socket["name"]] == [str(src), slot]
                assert kind == inputs[socket["name"]][0]
        for required in spec.get("required", {}):
            assert required in api_inputs, f"{name}: node {node['id']} misses {required}"
        for key, value in api_inputs.items():  # widget values are valid for the node
            if isinstance(value, list):
                continue
            kind = inputs[key][0]
            if isinstance(kind, list) and key not in ("ckpt_name", "gate_name"):
                assert value in kind, (node["type"], key, value)
            elif kind in ("INT", "FLOAT"):
                opts = inputs[key][1] if len(inputs[key]) > 1 else {}
                assert opts.get("min", value) <= value <= opts.get("max", value), (node["type"], key, value)


def test_example_command_without_a_checkpoint_offers_the_smoke_run():
    done = subprocess.run([sys.executable, "-m", "cli.run_example"], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 2
    assert "No checkpoint named" in done.stdout and "--smoke" in done.stdout


@pytest.mark.server
def test_example_command_smoke_run_writes_the_image_and_the_gate_grid(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cli.run_example", "--smoke", "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SMOKE RUN" in done.stdout and "step 2/2" in done.stdout
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(n.startswith("MaskAttn_SMOKE_tiny_random_model") for n in names), names
    assert any(n.startswith("maskattn_gate_grid_SMOKE_tiny_random_model") for n in names), names
