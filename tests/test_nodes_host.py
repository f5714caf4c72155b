"""The Load / Save nodes against ComfyUI's folder_paths: models/maskattn, extra paths, errors that name the fix."""

import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture
def maskattn_dirs(host, tmp_path, monkeypatch):
    """models/maskattn pointed at a temp folder, plus a second folder as extra_model_paths.yaml would add it."""
    import folder_paths

    from comfyui_maskattn.nodes.paths import FOLDER, register_model_folder

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    saved = folder_paths.folder_names_and_paths.pop(FOLDER, None)
    extra = tmp_path / "extra"
    extra.mkdir()
    folder_paths.add_model_folder_path(FOLDER, str(extra))  # what an extra_model_paths.yaml entry does
    register_model_folder()
    main = tmp_path / "models" / "maskattn"
    assert main.is_dir()  # register_model_folder creates the folder users are told to use
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.clear()
    yield main, extra
    folder_paths.folder_names_and_paths.pop(FOLDER, None)
    if saved is not None:
        folder_paths.folder_names_and_paths[FOLDER] = saved
    if isinstance(cache, dict):
        cache.clear()


def small_gates(host):
    from comfyui_maskattn.masks.gates import MaskAttnGates
    from comfyui_maskattn.nodes.hooks import model_sites

    return MaskAttnGates.fresh(model_sites(host.tiny_sdxl()), hidden_dim=8, seed=0, stage="all")


def test_folder_lists_gate_files_from_models_and_extra_paths_only(host, maskattn_dirs):
    from comfyui_maskattn.masks.gatefile import save_gates
    from comfyui_maskattn.nodes.gates import MaskAttnLoadGates

    main, extra = maskattn_dirs
    save_gates(small_gates(host), main / "a.safetensors")
    save_gates(small_gates(host), extra / "b.safetensors")
    (main / "notes.txt").write_text("not a gate file")
    listed = MaskAttnLoadGates.INPUT_TYPES()["required"]["gate_name"][0]
    assert sorted(listed) == ["a.safetensors", "b.safetensors"]
    (gates,) = MaskAttnLoadGates().load("b.safetensors")
    assert gates.source == "b.safetensors" and len(gates.site_heads) == 22  # every site of the tiny SDXL


def test_load_errors_name_the_node_file_and_fix(host, maskattn_dirs):
    from comfyui_maskattn.nodes.gates import MaskAttnLoadGates

    main, _ = maskattn_dirs
    (main / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"^Load MaskAttn Gates: broken\.safetensors: not a readable"):
        MaskAttnLoadGates().load("broken.safetensors")
    with pytest.raises(ValueError, match=r"Load MaskAttn Gates: gate_name 'gone\.safetensors' is not in .*maskattn"
                                         r".*The folder has: broken\.safetensors; pick one in gate_name"):
        MaskAttnLoadGates().load("gone.safetensors")


def test_save_counts_up_never_overwrites_and_stays_inside_the_folder(host, maskattn_dirs):
    from comfyui_maskattn.masks.gatefile import load_gates
    from comfyui_maskattn.nodes.gates import MaskAttnSaveGates

    main, _ = maskattn_dirs
    gates = small_gates(host)
    first = MaskAttnSaveGates().save(gates, "mine/gates")
    second = MaskAttnSaveGates().save(gates, "mine/gates")
    assert first["ui"]["text"] == [os.path.join("mine", "gates_00001.safetensors")]
    assert second["ui"]["text"] == [os.path.join("mine", "gates_00002.safetensors")]
    loaded = load_gates(main / "mine" / "gates_00002.safetensors")
    for a, b in zip(gates.heads.parameters(), loaded.heads.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="Save MaskAttn Gates: filename_prefix '../../x' points outside"):
        MaskAttnSaveGates().save(gates, "../../x")


def test_pack_root_registers_its_nodes_and_web_directory(host):
    import importlib.util
    import sys

    from comfy_host import REPO_ROOT

    spec = importlib.util.spec_from_file_location("maskattn_pack_as_comfyui_loads_it", REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert {"MaskAttnLoadGates", "MaskAttnApply", "MaskAttnSaveGates"} <= set(module.NODE_CLASS_MAPPINGS)
    assert module.NODE_DISPLAY_NAME_MAPPINGS["MaskAttnApply"] == "Apply MaskAttn"
    assert (REPO_ROOT / module.WEB_DIRECTORY).is_dir()
    for cls in module.NODE_CLASS_MAPPINGS.values():  # classic V1 nodes: what every ComfyUI runs
        assert cls.CATEGORY.startswith("MaskAttn") and isinstance(cls.RETURN_TYPES, tuple)
        assert callable(getattr(cls, cls.FUNCTION)) and "required" in cls.INPUT_TYPES()


def test_save_refuses_gates_without_weights(host, maskattn_dirs):
    from comfyui_maskattn.masks.source import PromptGateSource
    from comfyui_maskattn.nodes.gates import MaskAttnSaveGates

    class PromptGates(PromptGateSource):  # what a training-free source looks like to Save: no heads
        kind = "zero-shot"

    with pytest.raises(ValueError, match="Save MaskAttn Gates: zero-shot gates .* no weights to save"):
        MaskAttnSaveGates().save(PromptGates(), "x")


def test_every_stage_input_offers_the_one_stage_list(host):
    from comfyui_maskattn.masks.topology import STAGE_CHOICES
    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS

    offered = {}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            if "stage" in group:
                offered[name] = group["stage"][0]
    assert {"MaskAttnApply", "MaskAttnTrainGates"} <= set(offered)
    assert all(choices == list(STAGE_CHOICES) for choices in offered.values()), offered
