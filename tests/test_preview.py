"""Record / Preview nodes in a real ComfyUI host, on a tiny random SDXL-architecture model."""

import copy

import pytest
import torch

pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture(scope="module")
def nodes(host):
    from comfyui_maskattn.nodes import gates, hooks, preview

    return gates, hooks, preview


@pytest.fixture(scope="module")
def sdxl(host):
    return host.tiny_sdxl(seed=0)


def random_gates(hooks, model, seed=0):
    from comfyui_maskattn.masks.gates import MaskAttnGates

    gates = MaskAttnGates.fresh(hooks.model_sites(model), hidden_dim=16, seed=seed, stage="all")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gates.heads.parameters():
            if p.ndim == 2:  # layer norms keep weight 1, biases 0: about half of the pairs are kept
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return gates


def patched(nodes, model, **record):
    gate_nodes, hooks, preview = nodes
    applied = gate_nodes.MaskAttnApply().apply(model, random_gates(hooks, model), 0.5, 1.0, "all", "encoder_decoder",
                                               0.0, 1.0)[0]
    args = dict(layers="all", steps="all", record_uncond=False, max_side=32, cap_mb=64)
    args.update(record)
    return applied, preview.MaskAttnRecordGates().record(applied, **args)[0]


def preview_args(**kw):
    args = dict(layers="mean", step="mean", rows="layers", tokens="", show="gate", opacity=0.6, batch_index=0)
    args.update(kw)
    return args


def test_recording_matches_the_gates_the_sampler_used(host, nodes, sdxl):
    _, hooks, preview = nodes
    applied, recorded = patched(nodes, sdxl)
    seen = []
    hooks.installed_runtime(recorded).observers.append(
        lambda key, res, info: seen.append((key, res.hard.detach().clone(), list(info["cond_or_uncond"]))))
    pos, neg = host.make_cond(sdxl, seed=1), host.make_cond(sdxl, seed=2)
    host.ksample(recorded, pos, neg, steps=2, width=64, height=64)
    hooks.installed_runtime(recorded).observers.pop()
    recorder = preview.model_recorder(recorded)
    run = recorder.latest()
    sites = [s.key for s in hooks.model_sites(sdxl)]
    assert set(run.sites) == set(sites) and run.steps_seen == 2 and len(run.bins) == 2 and run.tokens == 77
    from comfyui_maskattn.masks.record import site_map

    for step in range(2):
        for key in sites:
            hard = [h for k, h, _ in seen if k == key][step]
            chunks = [c for k, _, c in seen if k == key][step]
            cond = hard[chunks.index(0)]  # [N, T], one latent per chunk
            h, w = run.hw[key]
            expected = cond.T.reshape(77, h, w)  # 64 px: every level is at most 8x8 cells, no downsampling
            assert torch.allclose(site_map(run, key, step), expected, atol=1 / 255)
    # the input models carry no recorder; the patched one's clone shares the recorder without copying tensors
    assert preview.model_recorder(applied) is None and preview.model_recorder(sdxl) is None
    assert preview.model_recorder(recorded.clone()) is recorder
    assert copy.deepcopy(recorded.model_options)["transformer_options"][preview.RECORDER_KEY] is recorder


def viewer_data(out) -> dict:
    """The viewer's data as the browser fetches it: the file named in the node's `ui` output (ComfyUI's temp)."""
    import json
    import os

    import folder_paths

    (ref,) = out["ui"]["maskattn_viewer"]
    assert ref["type"] == "temp"
    path = os.path.join(folder_paths.get_temp_directory(), ref["subfolder"], ref["filename"])
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def drawn_grid(hooks, preview, recorded, text, image=None, **choice):
    """What the Preview node draws for these inputs, computed with masks/viewer.py and masks/render.py directly:
    (the tiles' titles, the grid as an IMAGE)."""
    from comfyui_maskattn.masks import render, viewer
    from comfyui_maskattn.masks.tokens import prompt_words
    from comfyui_maskattn.nodes.tokens import clip_tokens

    run = preview.model_recorder(recorded).latest()
    args = preview_args(**choice)
    opacity = args.pop("opacity")
    grid = viewer.select_grid(run, viewer.recorded_sites(hooks.model_sites(recorded), run),
                              prompt_words(*clip_tokens(None, text)), node="MaskAttn Preview Gates", **args)
    drawn, titles = render.render_grid(grid.tiles, grid.row_labels, grid.column_labels,
                                       render.base_image(image, grid.batch_index), opacity,
                                       render.tile_width(len(grid.columns)))
    return titles, render.to_image_tensor(drawn)


def test_preview_grid_labels_masks_and_viewer_payload(host, nodes, sdxl):
    _, hooks, preview = nodes
    _, recorded = patched(nodes, sdxl, layers="mid")
    pos, neg = host.make_cond(sdxl, seed=1), host.make_cond(sdxl, seed=2)
    host.ksample(recorded, pos, neg, steps=3)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    node = preview.MaskAttnPreviewGates()
    out = node.preview(recorded, **preview_args(layers="all"), image=image, text="a red cat wearing a hat",
                       unique_id="7")
    grid, masks = out["result"]
    mid = [s.name for s in hooks.model_sites(sdxl) if s.stage == "mid"]
    words = ["a", "red", "cat", "wearing", "a#2", "hat"]
    titles, drawn = drawn_grid(hooks, preview, recorded, "a red cat wearing a hat", image, layers="all")
    assert titles == [[f"{w} | {layer}" for w in words] for layer in mid]
    assert torch.equal(grid, drawn)  # the node's grid is the one drawn with these titles
    assert grid.ndim == 4 and grid.shape[-1] == 3 and grid.shape[1] > 64 * len(mid)
    assert masks.shape == (len(words), 64, 64) and 0 <= float(masks.min()) and float(masks.max()) <= 1
    assert out["ui"]["images"][0]["type"] == "temp" and "3 steps" in out["ui"]["text"][0]
    assert out["ui"]["text"][0].startswith("learned gates")  # zero-shot ones say "training-free" instead
    payload = viewer_data(out)
    assert [t["word"] for t in payload["tokens"]] == words
    assert payload["first_token"] == 1 and payload["groups"] == []  # "red": the first word that is not an article
    assert [layer["name"] for layer in payload["layers"]] == mid and len(payload["steps"]) == 3
    assert payload["image"]["type"] == "temp"
    import base64

    gate = base64.b64decode(payload["gate"])
    assert len(gate) == len(mid) * 3 * len(words) * payload["h"] * payload["w"]
    # a comma list of words, rows = steps, one stage's mean
    choice = dict(layers="mean:mid", rows="steps", tokens="cat, hat")
    out = node.preview(recorded, **preview_args(**choice), text="a red cat wearing a hat")
    titles, drawn = drawn_grid(hooks, preview, recorded, "a red cat wearing a hat", **choice)
    assert titles == [[f"cat | steps {i}-{i} (mean)".replace(f"steps {i}-{i}", f"step {i}"),
                       f"hat | step {i} (mean)"] for i in range(3)]
    assert torch.equal(out["result"][0], drawn)
    assert out["result"][1].shape == (2, 64, 64)  # no image: latent cells x 8


def test_prompt_words_come_from_the_text_encoder_of_the_conditioning(host, nodes):
    from comfyui_maskattn.masks.tokens import prompt_words
    from comfyui_maskattn.masks.viewer import choose_columns
    from comfyui_maskattn.nodes.tokens import clip_tokens

    _, _, preview = nodes
    words = prompt_words(*clip_tokens(None, "a photo of an astronaut riding a horse"))  # no CLIP: CLIP-L's tokenizer
    assert [w for w, _ in words] == ["a", "photo", "of", "an", "astronaut", "riding", "a", "horse"]
    assert words[0][1] == [1]  # position 0 is the start token
    prompt = {"5": {"class_type": "CLIPTextEncode", "inputs": {"text": "red cube", "clip": ["4", 1]}},
              "6": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["5", 0]}},
              "9": {"class_type": "MaskAttnPreviewGates", "inputs": {"conditioning": ["6", 0]}}}
    assert preview.traced_prompt_text(prompt, "9") == "red cube"
    assert preview.traced_prompt_text({}, "9") is None
    with pytest.raises(ValueError, match="MaskAttn Preview Gates: tokens: 'dog' is not a word.*red, cube"):
        choose_columns(prompt_words(*clip_tokens(None, "red cube")), "dog", 77, "MaskAttn Preview Gates")
    assert [c for c, _ in choose_columns([], "", 77, "x")][:2] == ["#1", "#2"]


def test_unpatched_model_or_recording_off_gives_a_message_not_a_crash(host, nodes, sdxl):
    gate_nodes, hooks, preview = nodes
    node = preview.MaskAttnPreviewGates()
    out = node.preview(sdxl, **preview_args())
    assert "not patched by MaskAttn" in out["ui"]["text"][0] and out["result"][0].ndim == 4
    assert out["ui"][preview.VIEWER_KEY] == [{"message": out["ui"]["text"][0]}]  # the viewer says it too
    applied = gate_nodes.MaskAttnApply().apply(sdxl, random_gates(hooks, sdxl), 0.5, 1.0, "all", "encoder_decoder",
                                               0.0, 1.0)[0]
    assert "recording is off" in node.preview(applied, **preview_args())["ui"]["text"][0]
    _, recorded = patched(nodes, sdxl)
    assert "nothing was recorded" in node.preview(recorded, **preview_args())["ui"]["text"][0]
    with pytest.raises(ValueError, match="MaskAttn Record Gates: this model is not patched"):
        preview.MaskAttnRecordGates().record(sdxl, "all", "all", False, 32, 64)
    with pytest.raises(ValueError, match="MaskAttn Record Gates: layers 'input.99'"):
        preview.MaskAttnRecordGates().record(applied, "input.99", "all", False, 32, 64)
    with pytest.raises(ValueError, match="MaskAttn Record Gates: steps 'x'"):
        preview.MaskAttnRecordGates().record(applied, "all", "x", False, 32, 64)


def test_two_runs_never_mix_and_the_preview_closes_a_run(host, nodes, sdxl):
    _, _, preview = nodes
    _, recorded = patched(nodes, sdxl)
    recorder = preview.model_recorder(recorded)
    pos, neg = host.make_cond(sdxl, seed=1), host.make_cond(sdxl, seed=2)
    host.ksample(recorded, pos, neg, steps=2, seed=1)
    first = recorder.latest()
    host.ksample(recorded, pos, neg, steps=1, seed=2)  # the next queued prompt, no viewer in between
    second = recorder.latest()
    assert second is not first and first.steps_seen == 2 and second.steps_seen == 1
    preview.MaskAttnPreviewGates().preview(recorded, **preview_args())
    assert recorder.current is None and recorder.last is second
    host.ksample(recorded, pos, neg, steps=1, seed=2)  # same schedule again: still a new run
    assert recorder.latest().run_id == second.run_id + 1
