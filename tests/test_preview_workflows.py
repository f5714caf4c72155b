"""The example workflows: current with tests/workflow_build.py, both formats agree, every node exists in stock
ComfyUI or this pack with valid widget values; and the headless example command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import workflow_build

REPO = Path(__file__).resolve().parent.parent


def test_workflow_files_are_what_the_builder_writes():
    built = workflow_build.build()
    on_disk = {str(p.relative_to(REPO / "workflows")) for p in (REPO / "workflows").rglob("*.json")}
    assert set(built) == on_disk, "a workflow file that tests/workflow_build.py does not write"
    for name, data in built.items():
        assert (REPO / "workflows" / name).read_text() == workflow_build.dumps(data), (
            f"workflows/{name} is stale: run `python tests/workflow_build.py`")


@pytest.mark.parametrize("name", ["maskattn_sdxl_viewer", "maskattn_sdxl_compare"])
def test_ui_and_api_formats_agree_and_every_node_exists(host, name):
    import nodes as comfy_nodes

    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS as pack

    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    api = json.loads((REPO / "workflows" / workflow_build.api_name(name)).read_text())
    known = {**comfy_nodes.NODE_CLASS_MAPPINGS, **pack}
    queued = [n for n in ui["nodes"] if n["type"] not in workflow_build.FRONTEND_ONLY_NODES and n["mode"] == 0]
    assert {str(n["id"]): n["type"] for n in queued} == {k: v["class_type"] for k, v in api.items()}
    # zero-shot gates by default; the learned-gate loader is there, bypassed, one Ctrl+B away, with a note saying so
    types = {n["type"]: n for n in ui["nodes"]}
    assert types["MaskAttnLoadGates"]["mode"] == workflow_build.BYPASSED and "MaskAttnLoadGates" not in str(api)
    assert "Ctrl+B" in types["Note"]["widgets_values"][0]
    apply = next(v for v in api.values() if v["class_type"] == "MaskAttnApply")
    assert api[apply["inputs"]["maskattn"][0]]["class_type"] == "MaskAttnZeroShotGates"
    links = {lk[0]: lk for lk in ui["links"]}
    for node in queued:
        cls = known.get(node["type"])
        assert cls is not None, f"{name}: {node['type']} is neither stock ComfyUI nor this pack"
        spec = cls.INPUT_TYPES()
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        api_inputs = api[str(node["id"])]["inputs"]
        for socket in node["inputs"]:  # links agree (a link from the bypassed loader arrives from its own input)
            if socket["link"] is not None:
                _, src, slot, dst, _, kind = links[socket["link"]]
                if types["MaskAttnLoadGates"]["id"] == src:
                    _, src, slot, *_ = links[types["MaskAttnLoadGates"]["inputs"][0]["link"]]
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


def test_example_command_builds_zero_shot_by_default_and_switches_to_learned_gates():
    from cli import run_example

    info = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["sdxl.safetensors"]]}}},
            "MaskAttnLoadGates": {"input": {"required": {"gate_name": [["mine.safetensors"]]}}}}
    zero = run_example.build_prompt(run_example.parse_args(["--checkpoint", "sdxl.safetensors", "--prompt", "a b"]),
                                    info)
    apply = zero[run_example.APPLY]["inputs"]
    assert zero[apply["maskattn"][0]]["class_type"] == "MaskAttnZeroShotGates"
    assert zero[run_example.ZERO_SHOT]["inputs"]["text"] == "a b" and run_example.LOAD_GATES not in zero
    learned = run_example.build_prompt(run_example.parse_args(["--checkpoint", "sdxl.safetensors", "--gates",
                                                               "mine.safetensors"]), info)
    loader = learned[learned[run_example.APPLY]["inputs"]["maskattn"][0]]
    assert loader == {"class_type": "MaskAttnLoadGates", "inputs": {"gate_name": "mine.safetensors"}}
    with pytest.raises(SystemExit, match="not in ComfyUI/models/maskattn.*leave it out for zero-shot"):
        run_example.build_prompt(run_example.parse_args(["--checkpoint", "sdxl.safetensors", "--gates", "x"]), info)
    with pytest.raises(SystemExit, match="exclude each other"):
        run_example.build_prompt(run_example.parse_args(["--checkpoint", "sdxl.safetensors", "--gates",
                                                         "mine.safetensors", "--zero-shot"]), info)
    assert Path(run_example.parse_args([]).out) == Path.home() / "maskattn_output"  # outside any work tree


def test_example_command_without_a_checkpoint_offers_the_smoke_run():
    done = subprocess.run([sys.executable, "-m", "cli.run_example"], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 2
    assert "No checkpoint named" in done.stdout and "--smoke" in done.stdout


@pytest.mark.server
def test_example_command_smoke_run_with_learned_gates_writes_the_image_and_the_gate_grid(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cli.run_example", "--smoke", "--gates", "tiny.safetensors",
                           "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SMOKE RUN" in done.stdout and "step 2/2" in done.stdout
    assert "gates: learned, tiny.safetensors" in done.stdout
    assert "learned gates" in done.stdout and "2 steps in 2 bins" in done.stdout  # recorded every step
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(n.startswith("MaskAttn_SMOKE_tiny_random_model") for n in names), names
    assert any(n.startswith("maskattn_gate_grid_SMOKE_tiny_random_model") for n in names), names


def _fresh_clone(tmp_path) -> Path:
    """The repository as a user gets it: a git clone when this is a checkout (CI's is), else a copy of the tree."""
    clone = tmp_path / "clone"
    done = subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], capture_output=True, text=True)
    if done.returncode:
        shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", "artifacts", "__pycache__"))
    return clone


@pytest.mark.server
def test_quickstart_from_a_fresh_clone_sets_up_and_runs_the_example_at_its_smallest_settings(tmp_path):
    clone = _fresh_clone(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run(["bash", "cli/quickstart.sh", "--steps", "2", "--size", "64", "--out", str(out)],
                          cwd=clone, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout
    assert "training-free zero-shot gates (no gate file)" in text and "step 2/2" in text, text[-3000:]
    assert "zero-shot grouping: red cube | blue sphere" in text, text[-3000:]
    written = [Path(line[len("wrote "):]) for line in text.splitlines() if line.startswith("wrote ")]
    assert len(written) == 2 and all(p.is_file() and p.parent == out for p in written), written
    assert not [p for p in clone.rglob("*.png") if "maskattn_output" in str(p)]  # nothing lands in the work tree
