"""The viewer's pure parts without a host: the prompt's words from a tokenization (masks/tokens.py), the Record /
Preview choices, the grid's maps and the web viewer's data (masks/viewer.py), the drawing (masks/render.py).

A hand-built run: three gated layers (one "high" at 16x16, two "mid" at 8x8), two steps, an 8-token prompt
"<start> a red cube and blue ball <end>"; the cond half keeps "red" on the left half of the image and "ball" on the
right half at every step, and "cube" everywhere at step 1 only.
"""

import base64

import numpy as np
import pytest
import torch

from comfyui_maskattn.masks import render, viewer
from comfyui_maskattn.masks.gate import GateResult
from comfyui_maskattn.masks.record import GateRecorder
from comfyui_maskattn.masks.tokens import first_encoder, prompt_words
from comfyui_maskattn.masks.topology import CrossAttnSite
from comfyui_maskattn.masks.viewer import ViewerInputError
from comfyui_maskattn.masks.layout import parse_layout
from comfyui_maskattn.masks.prompt import group_prompt
from comfyui_maskattn.masks.zeroshot import ZeroShotGates

NODE = "MaskAttn Preview Gates"
START, END = 49406, 49407
VOCAB = {START: "<|startoftext|>", END: "<|endoftext|>", 320: "a</w>", 736: "red</w>", 100: "cu", 101: "be</w>",
         267: ",</w>", 537: "and</w>", 1746: "blue</w>", 1612: "ball</w>", 0: "!</w>"}
WORDS = [("a", [1]), ("red", [2]), ("cube", [3]), ("and", [4]), ("blue", [5]), ("ball", [6])]
TOKENS = 8
RED, CUBE, BALL = 2, 3, 6


def site(block, number, index, level, stage):
    return CrossAttnSite(block, number, index, feature_dim=8, context_dim=8, heads=1, level=level,
                         attention_number=0, up_block=-1, stage=stage)


SITES = [site("input", 4, 0, 1, "high"), site("input", 7, 0, 2, "mid"), site("input", 7, 1, 2, "mid")]
SIDE = {1: 16, 2: 8}


def planted_hard(side: int, step: int) -> torch.Tensor:
    """[2, side*side, T]: row 0 (uncond) keeps nothing; row 1 (cond) keeps red left, ball right, cube at step 1."""
    hard = torch.zeros(2, side, side, TOKENS)
    hard[1, :, : side // 2, RED] = 1
    hard[1, :, side // 2:, BALL] = 1
    if step == 1:
        hard[1, :, :, CUBE] = 1
    return hard.reshape(2, side * side, TOKENS)


@pytest.fixture(scope="module")
def run():
    recorder = GateRecorder(max_side=64)
    for step, sigma in enumerate((10.0, 5.0)):
        info = {"sigmas": torch.tensor([sigma, sigma]), "cond_or_uncond": [1, 0], "original_shape": [2, 4, 32, 32]}
        for s in SITES:
            hard = planted_hard(SIDE[s.level], step)
            recorder(s.key, GateResult(probabilities=hard * 0.8 + 0.1, hard=hard, bias=(1 - hard) * -1e4), info)
    return recorder.latest()


# --- the prompt's words -------------------------------------------------------------------------------------------
def chunk(*items):
    return [(START, 1.0, 0), *items] + [(END, 1.0, 0)] * (TOKENS - 1 - len(items))


def test_prompt_words_skip_start_end_padding_and_punctuation_and_join_pieces():
    tokens = {"l": [chunk((320, 1.0, 1), (736, 1.0, 2), (100, 1.0, 3), (101, 1.0, 3), (267, 1.0, 3))]}
    assert prompt_words(tokens, VOCAB) == [("a", [1]), ("red", [2]), ("cube", [3, 4])]  # "," is not a word
    # a second 77-token chunk (here 8) continues the positions, after its own start token
    two = {"l": tokens["l"] + [chunk((1746, 1.0, 4), (1612, 1.0, 5))]}
    assert prompt_words(two, VOCAB)[3:] == [("blue", [TOKENS + 1]), ("ball", [TOKENS + 2])]
    # SDXL: CLIP-L's tokenization stands for both; CLIP-G pads with token 0 ("!"), never a word
    sdxl = {"g": [[(START, 1.0, 0), (1612, 1.0, 1), (END, 1.0, 0), (0, 1.0, 0)]], "l": [chunk((736, 1.0, 1))]}
    assert first_encoder(sdxl) == "l" and prompt_words(sdxl, VOCAB) == [("red", [1])]
    assert first_encoder({"g": []}) == "g"


def test_an_embedding_is_one_word_and_word_ids_are_not_needed():
    vector = torch.zeros(8)
    tokens = {"l": [chunk((736, 1.0, 1), (vector, 1.0, 2), (vector, 1.0, 2), (1612, 1.0, 3))]}
    assert prompt_words(tokens, VOCAB) == [("red", [1]), ("<embedding>", [2, 3]), ("ball", [4])]
    bare = {"l": [[item[:2] for item in chunk((736, 1.0), (1612, 1.0))]]}  # a CLIP that gives no word ids
    assert prompt_words(bare, VOCAB) == [("red", [1]), ("ball", [2])]
    assert prompt_words({}, VOCAB) == []


# --- the nodes' choices -------------------------------------------------------------------------------------------
def test_layer_choices():
    names = lambda chosen: [s.name for s in chosen]  # noqa: E731
    assert viewer.select_layers("all", SITES, NODE) == (SITES, False)
    assert viewer.select_layers(" Mean ", SITES, NODE) == (SITES, True)
    assert viewer.select_layers("", SITES, NODE) == (SITES, False)
    chosen, mean = viewer.select_layers("mid", SITES, NODE)
    assert names(chosen) == ["input.7.0", "input.7.1"] and not mean
    chosen, mean = viewer.select_layers("mean:mid", SITES, NODE)
    assert names(chosen) == ["input.7.0", "input.7.1"] and mean
    assert names(viewer.select_layers("input.7", SITES, NODE)[0]) == ["input.7.0", "input.7.1"]  # a whole block
    assert names(viewer.select_layers("input.7.1, input.4.0, input.7", SITES, NODE)[0]) == [
        "input.7.1", "input.4.0", "input.7.0"]  # in the order asked, each once
    with pytest.raises(ViewerInputError, match=r"^MaskAttn Preview Gates: layers 'low': no recorded layer is in "
                                               r"stage 'low' \(recorded stages: high, mid\)"):
        viewer.select_layers("low", SITES, NODE)
    with pytest.raises(ValueError, match="layers 'input.99': there is no layer 'input.99' among input.4.0, "
                                         "input.7.0, input.7.1. Use a name like"):
        viewer.select_layers("input.99", SITES, NODE)


def test_step_choices():
    assert viewer.parse_steps("all", "x") is None and viewer.parse_steps("", "x") is None
    assert viewer.parse_steps("0, 5, 12-10", "x") == {0, 5, 10, 11, 12}
    with pytest.raises(ViewerInputError, match="x: steps '1, two': 'two' is not a step index or a range"):
        viewer.parse_steps("1, two", "x")


def test_shown_step_and_columns(run):
    assert [viewer.parse_step(s, run.bins, NODE) for s in ("mean", " LAST", "1", "-2")] == ["mean", "last", 1, -2]
    with pytest.raises(ViewerInputError, match=r"step 2: this run kept 2 step bins \(step 0, step 1\)"):
        viewer.parse_step("2", run.bins, NODE)
    with pytest.raises(ViewerInputError, match="step 'first': use mean, last, or a step index"):
        viewer.parse_step("first", run.bins, NODE)
    words = WORDS + [("a", [7]), ("far", [90])]  # past the recorded context: no column
    assert [c for c, _ in viewer.choose_columns(words, "", TOKENS, NODE)] == [
        "a", "red", "cube", "and", "blue", "ball", "a#2"]
    assert viewer.choose_columns(words, "Ball, red, a", TOKENS, NODE) == [
        ("ball", [6]), ("red", [2]), ("a", [1]), ("a#2", [7])]
    with pytest.raises(ViewerInputError, match="tokens: 'far' is not a word of the prompt. Words: a, red, cube"):
        viewer.choose_columns(words, "far", TOKENS, NODE)
    assert len(viewer.choose_columns([(f"w{i}", [1]) for i in range(40)], "", TOKENS, NODE)) == viewer.MAX_COLUMNS
    assert viewer.choose_columns([], "", 4, NODE) == [("#1", [1]), ("#2", [2]), ("#3", [3])]  # no prompt text


# --- the grid's maps ----------------------------------------------------------------------------------------------
def grid(run, **choice):
    args = dict(layers="all", step="mean", rows="layers", tokens="red, cube, ball", show="gate", batch_index=0)
    args.update(choice)
    return viewer.select_grid(run, viewer.recorded_sites(SITES, run), WORDS, node=NODE, **args)


def test_grid_rows_hold_the_planted_gates(run):
    g = grid(run)
    assert g.row_labels == ["input.4.0", "input.7.0", "input.7.1"] and g.column_labels == ["red", "cube", "ball"]
    tiles = g.tiles
    assert tiles.shape == (3, 3, 16, 16) and g.hw == (16, 16)  # every layer at the finest recorded level
    for r in range(3):
        assert torch.allclose(tiles[r, 0, :, :7], torch.ones(16, 7)) and float(tiles[r, 0, :, 9:].max()) == 0
        assert torch.allclose(tiles[r, 2, :, 9:], torch.ones(16, 7)) and float(tiles[r, 2, :, :7].max()) == 0
        assert torch.allclose(tiles[r, 1], torch.full((16, 16), 0.5))  # cube: one of the two steps
    assert torch.allclose(grid(run, step="1").tiles[:, 1], torch.ones(3, 16, 16))
    assert float(grid(run, step="0").tiles[:, 1].max()) == 0
    probability = grid(run, show="probability", step="last").tiles
    assert torch.allclose(probability[:, 1], torch.full((3, 16, 16), 0.9), atol=1 / 255)
    steps = grid(run, layers="mean:mid", rows="steps")
    assert steps.row_labels == ["step 0 (mean)", "step 1 (mean)"] and steps.tiles.shape == (2, 3, 16, 16)
    assert float(steps.tiles[0, 1].max()) == 0 and torch.allclose(steps.tiles[1, 1], torch.ones(16, 16))
    assert grid(run, layers="input.7.0", rows="steps").row_labels == ["step 0 (input.7.0)", "step 1 (input.7.0)"]
    assert grid(run, layers="mean:mid").row_labels == ["mean of 2 layers (mid)"]
    assert grid(run, layers="mean").row_labels == ["mean of 3 layers"]
    assert grid(run, layers="input.4.0").row_labels == ["input.4.0"]
    assert grid(run, batch_index=7).batch_index == 0  # past the batch: its last image


def test_word_masks_and_their_size(run):
    g = grid(run, layers="mid", step="1")
    masks = viewer.word_masks(run, g, (32, 48))
    assert masks.shape == (3, 32, 48) and torch.allclose(masks[1], torch.ones(32, 48))
    assert float(masks[0, :, :20].min()) > 0.99 and float(masks[0, :, 28:].max()) < 0.01
    image, latent = torch.zeros(2, 40, 56, 3), {"samples": torch.zeros(1, 4, 5, 7)}
    assert viewer.output_size(image, latent, (4, 4)) == (40, 56)
    assert viewer.output_size(None, latent, (4, 4)) == (40, 56)
    assert viewer.output_size(None, None, (4, 6)) == (32, 48)


# --- the web viewer's data ----------------------------------------------------------------------------------------
PAYLOAD_KEYS = ["run", "summary", "layers", "steps", "tokens", "h", "w", "present", "gate", "probability", "image",
                "opacity", "first_token", "groups", "group_gate"]  # what web/maskattn.js reads


def decoded(payload, key, *shape):
    return np.frombuffer(base64.b64decode(payload[key]), dtype=np.uint8).reshape(*shape)


def zero_shot_gates():
    token_groups = [-1] * TOKENS
    for p, g in ((2, 0), (3, 0), (5, 1), (6, 1)):
        token_groups[p] = g
    return ZeroShotGates(group_prompt("a red cube and a blue ball"), token_groups, stage="all")


def test_groups_mode_gets_each_groups_place_from_the_prompts_layout(run):
    recorded = viewer.recorded_sites(SITES, run)
    columns = viewer.choose_columns(WORDS, "a, blue, red, cube", TOKENS, NODE)
    token_groups = [-1] * TOKENS
    for p, g in ((2, 0), (3, 0), (5, 1), (6, 1)):
        token_groups[p] = g
    grouping = group_prompt("a red cube beside a blue ball")
    gates = ZeroShotGates(grouping, token_groups, stage="all", layout=parse_layout(grouping))
    payload = viewer.viewer_payload(run, recorded, columns, 0, None, 0.5, gates)
    assert payload["layout"] == [{"x": [0.0, 0.5], "y": [0.0, 1.0]}, {"x": [0.5, 1.0], "y": [0.0, 1.0]}]
    assert len(payload["layout"]) == len(payload["groups"])
    assert viewer.layout_places(gates, 4) == [{"x": [0.0, 0.5], "y": [0.0, 1.0]}]  # only the recorded groups
    assert "layout" not in viewer.viewer_payload(run, recorded, columns, 0, None, 0.5, zero_shot_gates())


def test_viewer_payload_holds_every_layer_step_and_word(run):
    recorded = viewer.recorded_sites(SITES, run)
    columns = viewer.choose_columns(WORDS, "a, blue, red, cube", TOKENS, NODE)
    image = {"filename": "base.png", "subfolder": "", "type": "temp"}
    payload = viewer.viewer_payload(run, recorded, columns, 0, image, 0.6)
    assert list(payload) == PAYLOAD_KEYS and payload["image"] == image and payload["opacity"] == 0.6
    assert [layer["name"] for layer in payload["layers"]] == ["input.4.0", "input.7.0", "input.7.1"]
    assert payload["layers"][1] == {"name": "input.7.0", "stage": "mid",
                                    "diffusers": "down_blocks.2.attentions.0.transformer_blocks.0.attn2"}
    assert [(s["label"], s["first"], s["sigma"]) for s in payload["steps"]] == [("step 0", 0, [10.0, 10.0]),
                                                                               ("step 1", 1, [5.0, 5.0])]
    assert payload["tokens"] == [{"word": w, "positions": p} for w, p in columns]
    gate = decoded(payload, "gate", 3, 2, 4, payload["h"], payload["w"])  # layer, step, word, h, w
    assert (payload["h"], payload["w"]) == (16, 16) and (decoded(payload, "present", 3, 2) == 1).all()
    assert (gate[:, :, 2, :, :7] == 255).all() and (gate[:, :, 2, :, 9:] == 0).all()  # red: left
    assert (gate[:, 0, 3] == 0).all() and (gate[:, 1, 3] == 255).all()  # cube: step 1 only
    assert (decoded(payload, "probability", 3, 2, 4, 16, 16)[:, 1, 3] == 230).all()  # 0.9
    assert payload["first_token"] == 1  # "blue": the first word that is not an article
    assert payload["groups"] == [] and payload["group_gate"] == ""


def test_zero_shot_groups_open_the_viewer_and_leakage_is_reported(run):
    recorded = viewer.recorded_sites(SITES, run)
    columns = viewer.choose_columns(WORDS, "a, blue, red, cube", TOKENS, NODE)
    gates = zero_shot_gates()
    assert viewer.group_positions(gates, TOKENS) == [("red cube", [2, 3]), ("blue ball", [5, 6])]
    assert viewer.group_positions(gates, 3) == [("red cube", [2])]  # only the recorded context
    leakage = [{"word": "red", "group": "red cube", "inside": 0.8312}]
    payload = viewer.viewer_payload(run, recorded, columns, 0, None, 0.5, gates, leakage)
    assert payload["first_token"] == 2  # the first group's first word
    assert payload["groups"] == [{"name": "red cube", "positions": [2, 3]}, {"name": "blue ball", "positions": [5, 6]}]
    group_gate = decoded(payload, "group_gate", 3, 2, 2, 16, 16)
    assert (group_gate[:, 0, 0, :, :7] == 128).all() and (group_gate[:, 1, 0, :, :7] == 255).all()  # red (+ cube)
    assert (group_gate[:, :, 1, :, 9:] == 128).all()  # ball, not blue
    assert payload["leakage"] == leakage and list(payload)[-1] == "leakage"
    assert viewer.gate_source_label(gates) == "training-free zero-shot gates"

    class Measured:  # what the leakage report reads of zero-shot gates after a run
        def leakage(self):
            return [("red", "red cube", 0.831249), ("ball", "blue ball", 0.5)]

    entries, words = viewer.leakage_report(Measured())
    assert entries == [{"word": "red", "group": "red cube", "inside": 0.8312},
                       {"word": "ball", "group": "blue ball", "inside": 0.5}]
    assert words == "; attention inside its region: red 83%, ball 50%"
    assert viewer.leakage_report(gates) == ([], "")  # no run seen yet


def test_viewer_payload_halves_its_maps_to_stay_in_budget(run, monkeypatch):
    recorded = viewer.recorded_sites(SITES, run)
    columns = viewer.choose_columns(WORDS, "red, cube", TOKENS, NODE)
    monkeypatch.setattr(viewer, "VIEWER_BUDGET", 3 * 2 * 2 * 8 * 8)
    payload = viewer.viewer_payload(run, recorded, columns, 0, None, 0.6)
    assert (payload["h"], payload["w"]) == (8, 8)
    gate = decoded(payload, "gate", 3, 2, 2, 8, 8)
    assert (gate[:, :, 0, :, :3] == 255).all() and (gate[:, :, 0, :, 5:] == 0).all()


# --- drawing ------------------------------------------------------------------------------------------------------
def test_the_grid_is_titled_word_then_row_and_draws_each_tile():
    tiles = torch.stack([torch.ones(3, 4, 4), torch.zeros(3, 4, 4)])  # row 0 all kept, row 1 nothing
    image, titles = render.render_grid(tiles, ["input.7.0", "step 1 (mean)"], ["red", "cube", "a#2"], None, 0.6, 40)
    assert titles == [["red | input.7.0", "cube | input.7.0", "a#2 | input.7.0"],
                      ["red | step 1 (mean)", "cube | step 1 (mean)", "a#2 | step 1 (mean)"]]
    pad, title_h, tile = render.PAD, render.TITLE_H, 40
    assert image.size == (3 * (tile + pad) + pad, 2 * (tile + title_h + pad) + pad)
    pixels = np.asarray(image)
    for k in range(3):
        x = pad + k * (tile + pad) + tile // 2
        assert tuple(pixels[pad + title_h + tile // 2, x]) == (252, 255, 164)  # the colour map's top
        assert tuple(pixels[2 * pad + 2 * title_h + tile + tile // 2, x]) == (0, 0, 4)  # its bottom
    assert (pixels[pad:pad + title_h, pad:pad + tile] == 255).any()  # the word's title, in white
    base = np.full((8, 16, 3), 200, dtype=np.uint8)  # a 1:2 image: tiles follow its aspect
    under, _ = render.render_grid(tiles, ["r0", "r1"], ["a", "b", "c"], base, 0.0, 40)
    assert under.size[1] == 2 * (20 + title_h + pad) + pad
    assert tuple(np.asarray(under)[pad + title_h + 10, pad + 20]) == (200, 200, 200)  # opacity 0: the image
    assert render.tile_width(8) == 160 and render.tile_width(9) == 112


def test_message_card_and_image_conversions():
    short, long = render.message_image("no run yet"), render.message_image("word " * 100)
    assert short.size == (512, 32) and long.size[0] == 512 and long.size[1] > 100
    tensor = render.to_image_tensor(short)
    assert tensor.shape == (1, 32, 512, 3) and float(tensor.max()) <= 1 and tensor.dtype == torch.float32
    batch = torch.zeros(2, 6, 10, 4)
    batch[1, ..., 0] = 1.0
    base = render.base_image(batch, 5)  # past the batch: the last image; alpha dropped
    assert base.shape == (6, 10, 3) and base.dtype == np.uint8 and (base[..., 0] == 255).all()
    assert render.base_image(None, 0) is None and render.base_image(torch.zeros(6, 10, 3), 0) is None
    assert render.thumbnail(np.zeros((600, 1024, 3), dtype=np.uint8)).size == (512, 300)
    assert render.thumbnail(np.zeros((60, 100, 3), dtype=np.uint8)).size == (100, 60)
    assert render.colormap(np.array([0.0, 1.0, 2.0])).tolist() == [[0, 0, 4], [252, 255, 164], [252, 255, 164]]
