"""Gate files: our .safetensors format round-trips; reference .pt checkpoints import; bad files get clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_maskattn.masks.gatefile import GateFileError, import_reference_checkpoint, load_gates, save_gates
from comfyui_maskattn.masks.gates import MaskAttnGates
from comfyui_maskattn.masks.topology import diffusers_name_to_key, name_to_key


def sample_gates(seed=0):
    torch.manual_seed(seed)
    from comfyui_maskattn.masks.gate import GateHead

    heads = torch.nn.ModuleList([GateHead(64, 48, 16), GateHead(64, 48, 16)])
    for p in heads.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    site_heads = {("input", 7, 0): 0, ("output", 1, 0): 0, ("middle", 0, 0): 1}
    stages = {("input", 7, 0): "mid", ("output", 1, 0): "mid", ("middle", 0, 0): "low"}
    return MaskAttnGates(heads=heads, site_heads=site_heads, site_stages=stages, architecture="tiny", stage="all",
                         threshold=0.4, kind="test_only")


def test_round_trip_keeps_tensors_sites_and_settings(tmp_path):
    gates = sample_gates()
    path = save_gates(gates, tmp_path / "g.safetensors")
    loaded = load_gates(path)
    assert loaded.site_heads == gates.site_heads and loaded.site_stages == gates.site_stages
    assert (loaded.architecture, loaded.stage, loaded.threshold, loaded.kind) == ("tiny", "all", 0.4, "test_only")
    assert loaded.source == "g.safetensors" and loaded.hidden_dim == 16
    for a, b in zip(gates.heads, loaded.heads):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert not (tmp_path / "g.safetensors.partial").exists()


def test_metadata_is_readable_json(tmp_path):
    from safetensors import safe_open

    path = save_gates(sample_gates(), tmp_path / "g.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "maskattn-comfyui-gates" and meta["format_version"] == "1"
    assert json.loads(meta["sites"])["middle.0.0"] == {"head": 1, "stage": "low"}
    assert meta["hidden_size"] == "16"


def test_truncated_file_error_names_the_file(tmp_path):
    path = save_gates(sample_gates(), tmp_path / "half.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GateFileError, match=r"half\.safetensors.*truncated"):
        load_gates(path)


def test_checkpoint_or_lora_is_not_a_gate_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(path))
    with pytest.raises(GateFileError, match=r"model\.safetensors: not a MaskAttn gate file.*checkpoint or LoRA"):
        load_gates(path)


def test_newer_format_version_asks_for_an_update(tmp_path):
    path = save_gates(sample_gates(), tmp_path / "new.safetensors", extra_metadata={"format_version": "9"})
    with pytest.raises(GateFileError, match="update the MaskAttn node pack"):
        load_gates(path)


def test_missing_file_says_where_gates_go(tmp_path):
    with pytest.raises(GateFileError, match="models/maskattn"):
        load_gates(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name,key", [
    ("down_blocks.1.attentions.0.transformer_blocks.1.attn2", ("input", 4, 1)),
    ("down_blocks.1.attentions.1.transformer_blocks.0.attn2", ("input", 5, 0)),
    ("down_blocks.2.attentions.0.transformer_blocks.3.attn2.processor", ("input", 7, 3)),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2", ("input", 8, 9)),
    ("mid_block.attentions.0.transformer_blocks.4.attn2", ("middle", 0, 4)),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn2", ("output", 0, 0)),
    ("up_blocks.0.attentions.2.transformer_blocks.9.attn2", ("output", 2, 9)),
    ("up_blocks.1.attentions.2.transformer_blocks.1.attn2", ("output", 5, 1)),
])
def test_diffusers_names_map_to_comfyui_keys(name, key):
    assert diffusers_name_to_key(name) == key
    assert name_to_key(f"{key[0]}.{key[1]}.{key[2]}") == key


def reference_checkpoint(layers_by_stage, dims=(1280, 2048, 128), seed=0):
    """A checkpoint laid out exactly as the reference's save_maskattn_checkpoint writes it (shared heads)."""
    from comfyui_maskattn.masks.gate import GateHead

    torch.manual_seed(seed)
    state, stage_by_layer, heads = {}, {}, {}
    for stage, layers in layers_by_stage.items():
        head = heads.setdefault(stage, GateHead(*dims))
        for p in head.parameters():
            torch.nn.init.normal_(p, 0, 0.1)
        for layer in layers:
            proc = f"{layer}.processor"
            stage_by_layer[proc] = stage
            for k, v in head.state_dict().items():
                state[f"{proc}.gate_head.{k}"] = v
    ckpt = {
        "format": "maskattn-sdxl-gates-v1", "checkpoint_kind": "trained",
        "maskattn_config": {"stage": "all", "placement": "encoder_decoder", "threshold": 0.5,
                            "negative_value": -1.0e4, "gate_hidden_dim": dims[2], "share_gate_heads_by_stage": True},
        "selected_layers": list(stage_by_layer), "stage_by_layer": stage_by_layer, "gate_state_dict": state,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}}, "param_groups": [
            {"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]},
        "global_step": 100,
    }
    return ckpt, heads


def test_reference_checkpoint_imports_onto_comfyui_sites(tmp_path):
    mid = [f"down_blocks.2.attentions.{a}.transformer_blocks.{t}.attn2" for a in (0, 1) for t in range(10)] + [
        f"up_blocks.0.attentions.{a}.transformer_blocks.{t}.attn2" for a in (0, 1, 2) for t in range(10)]
    low = [f"mid_block.attentions.0.transformer_blocks.{t}.attn2" for t in range(10)]
    ckpt, heads = reference_checkpoint({"mid": mid, "low": low})
    path = tmp_path / "gate_final.pt"
    torch.save(ckpt, path)
    gates = import_reference_checkpoint(path)
    assert len(gates.heads) == 2  # shared heads merged back: one per stage, as trained
    assert len(gates.site_heads) == 60 and gates.architecture == "sdxl" and gates.kind == "trained"
    assert gates.site_stages[("input", 8, 9)] == "mid" and gates.site_stages[("middle", 0, 3)] == "low"
    mid_head = gates.head(("output", 2, 4))
    for k, v in heads["mid"].state_dict().items():
        assert torch.equal(mid_head.state_dict()[k], v)
    assert gates.head(("input", 7, 0)) is mid_head
    assert load_gates(path).site_heads == gates.site_heads  # the Load node's entry point takes .pt too


def test_pickled_code_in_a_pt_file_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "maskattn-sdxl-gates-v1", "x": Evil()}, path)
    with pytest.raises(GateFileError, match=r"evil\.pt: .*refuses to run"):
        load_gates(path)


def test_other_pt_files_are_named_as_such(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    with pytest.raises(GateFileError, match=r"lora\.pt: not a MaskAttn-SDXL reference gate checkpoint"):
        load_gates(path)
