"""What a new user meets first: the gate folder exists, a missing gate file says what to do, errors read well, gate
files name their architecture. (The shipped workflows, the headless example and the Quickstart are tested in
tests/test_preview_workflows.py and tests/test_browser.py.)"""

from dataclasses import replace

import pytest

from comfyui_maskattn.masks.topology import CrossAttnSite, architecture_name


def _site(block, number, feature, context, level, stage):
    return CrossAttnSite(block=block, number=number, index=0, feature_dim=feature, context_dim=context, heads=8,
                         level=level, attention_number=0, up_block=-1, stage=stage)


@pytest.mark.parametrize("stage", ["all", "mid", "high", "low"])
def test_architecture_is_named_from_any_stage_of_the_model(stage):
    sd1 = [_site("input", 1, 320, 768, 0, "high"), _site("input", 7, 1280, 768, 2, "mid"),
           _site("middle", 0, 1280, 768, 3, "low")]
    sdxl = [_site("input", 4, 640, 2048, 1, "high"), _site("input", 7, 1280, 2048, 2, "mid"),
            _site("middle", 0, 1280, 2048, 2, "low")]
    for sites, name in ((sd1, "sd1"), (sdxl, "sdxl"), ([replace(s, context_dim=1024) for s in sd1], "sd2")):
        chosen = [s for s in sites if stage == "all" or s.stage == stage]
        assert architecture_name(chosen) == name
    tiny = [replace(s, context_dim=64) for s in sdxl]
    assert architecture_name(tiny).startswith("unet(context=64")


def test_node_errors_read_as_maskattn_errors_in_comfyui(host):
    import execution

    from comfyui_maskattn.nodes.gates import NodeError

    assert execution.full_type_name(NodeError) == "MaskAttn.NodeError"  # not a path to the pack's folder


def test_the_gate_folder_is_created_when_the_pack_loads(host, tmp_path, monkeypatch):
    import folder_paths

    from comfyui_maskattn.nodes import paths

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, paths.FOLDER, ([], set()))
    paths.register_model_folder()
    assert (tmp_path / "models" / "maskattn").is_dir()
    assert paths.gate_folders()[0] == str(tmp_path / "models" / "maskattn") and paths.gate_files() == []


def test_a_missing_gate_file_gets_a_message_that_says_what_to_do(host, tmp_path, monkeypatch):
    import folder_paths

    from comfyui_maskattn.nodes import paths
    from comfyui_maskattn.nodes.gates import MaskAttnLoadGates, NodeError

    folder = tmp_path / "maskattn"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, paths.FOLDER, ([str(folder)], {".safetensors"}))
    if hasattr(folder_paths, "filename_list_cache"):
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    node = MaskAttnLoadGates()
    # the list check is the node's own, so a missing file reaches load() and its message, not "not in []"
    assert MaskAttnLoadGates.VALIDATE_INPUTS(gate_name="maskattn_gates_00001.safetensors") is True
    with pytest.raises(NodeError) as empty:
        node.load("maskattn_gates_00001.safetensors")
    text = str(empty.value)
    assert text.startswith("Load MaskAttn Gates: gate_name 'maskattn_gates_00001.safetensors' is not in")
    assert "folder is empty" in text and "No trained MaskAttn gates are published" in text
    assert "MaskAttn Zero-Shot Gates" in text and "cli.train" in text
    (folder / "mine.safetensors").write_bytes(b"")
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    with pytest.raises(NodeError, match="The folder has: mine.safetensors; pick one in gate_name"):
        node.load("maskattn_gates_00001.safetensors")
    # bypassed in the example workflows: its maskattn input is what passes through; when it runs, it is ignored
    assert "maskattn" in MaskAttnLoadGates.INPUT_TYPES()["optional"]
