"""The layout prior from the prompt's spatial words, without a host: the phrasing table, the prior's maths, and the
zero-shot gates that use it (places before the handover, combined or handed over after, bit-identity without one)."""

import pytest
import torch

from comfyui_maskattn.masks.layout import describe_band, layout_prior, parse_layout
from comfyui_maskattn.masks.prompt import group_prompt, grouping_from_text
from comfyui_maskattn.masks.source import HANDOVER_SIGMA
from comfyui_maskattn.masks.zeroshot import ZeroShotGates

L, R, T, B = "left half", "right half", "top half", "bottom half"

# prompt -> each group's place ("" for a prompt that gives no layout), or ("note", text the notes must contain)
PHRASINGS = [
    ("a red cube to the left of a blue sphere", {"red cube": L, "blue sphere": R}),
    ("a red cube on the left of a blue sphere", {"red cube": L, "blue sphere": R}),
    ("a red cube left of a blue sphere", {"red cube": L, "blue sphere": R}),
    ("a red cube on the left side of a blue sphere", {"red cube": L, "blue sphere": R}),
    ("a red cube to the left side of a blue sphere", {"red cube": L, "blue sphere": R}),
    ("a red cube to the far left of a blue sphere", {"red cube": L, "blue sphere": R}),
    ("a cat to the right of a dog", {"cat": R, "dog": L}),
    ("a cat on the right of a dog", {"cat": R, "dog": L}),
    ("a cat right of a dog", {"cat": R, "dog": L}),
    ("a cat on the right hand side of a dog", {"cat": R, "dog": L}),
    ("a lamp above a table", {"lamp": T, "table": B}),
    ("a lamp over a table", {"lamp": T, "table": B}),
    ("a cat on top of a box", {"cat": T, "box": B}),
    ("a cat atop a box", {"cat": T, "box": B}),
    ("a ball below a chair", {"ball": B, "chair": T}),
    ("a ball under a chair", {"ball": B, "chair": T}),
    ("a ball beneath a chair", {"ball": B, "chair": T}),
    ("a ball underneath a chair", {"ball": B, "chair": T}),
    ("a cat beside a dog", {"cat": L, "dog": R}),
    ("a cat next to a dog", {"cat": L, "dog": R}),
    ("a cat alongside a dog", {"cat": L, "dog": R}),
    ("a dog between a cat and a horse", {"dog": "centre third", "cat": "left third", "horse": "right third"}),
    ("a dog in between a cat and a horse", {"dog": "centre third", "cat": "left third", "horse": "right third"}),
    ("a cat next to a dog beside a horse", {"cat": "left third", "dog": "centre third", "horse": "right third"}),
    ("a red cube on the left, a blue sphere on the right", {"red cube": L, "blue sphere": R}),
    ("on the left, a red apple; on the right, a green pear", {"red apple": L, "green pear": R}),
    ("a cat at the bottom, a dog at the top", {"cat": B, "dog": T}),
    ("a cat to the left and a dog to the right", {"cat": L, "dog": R}),
    ("a lamp in the middle", {"lamp": "the middle"}),
    ("a lamp in the center", {"lamp": "the middle"}),
    ("a lamp in the centre", {"lamp": "the middle"}),
    ("a vase in the top right corner", {"vase": "top-right quarter"}),
    ("a vase in the bottom right corner", {"vase": "bottom-right quarter"}),
    ("a vase in the lower left corner", {"vase": "bottom-left quarter"}),
    ("a vase at the bottom left", {"vase": "bottom-left quarter"}),
    ("a mug in the top-left corner and a plate in the bottom right", {"mug": "top-left quarter",
                                                                      "plate": "bottom-right quarter"}),
    ("in the bottom right corner a small vase", {"small vase": "bottom-right quarter"}),
    ("a (red:1.2) cube to the left of a ((blue)) sphere", {"red cube": L, "blue sphere": R}),
    ("a photo of a red cube to the left of a blue sphere, masterpiece, 8k", {"red cube": L, "blue sphere": R}),
    ("a bird above a tree, a dog under the tree", {"bird": "top third", "tree tree": "middle third",
                                                   "dog": "bottom third"}),
    ("a cat to the left of a dog above a bird", {"cat": L, "dog": "top-right quarter", "bird": B}),
    ("a cat to the left of the dog and a bird", {"cat": L, "dog": R, "bird": "anywhere"}),
    ("a dog on top of a car to the left of a tree", {"dog": T, "car": "bottom-left quarter", "tree": R}),
    ("on the left a red cube, on the right a blue sphere", {"red cube": L, "blue sphere": R}),
    ("in the middle a lamp, on the left a chair, on the right a sofa", {"lamp": "the middle", "chair": L,
                                                                       "sofa": R}),
    ("a knight, in the top right corner a dragon", {"knight": "anywhere", "dragon": "top-right quarter"}),
    ("a cat on the far left, a dog on the far right", {"cat": L, "dog": R}),
    ("a cat on the left of the picture", {"cat": L}),
    ("a cat to the left of a dog and to the right of a bird", {"cat": "centre third", "dog": "right third",
                                                               "bird": "left third"}),
    ("a lamp between a sofa and a chair. a cat above the sofa", {"lamp": "centre third",
                                                                 "sofa sofa": "bottom half, left third",
                                                                 "chair": "right third", "cat": T}),
    ("a cat left of a dog, a dog left of a bird, a bird left of a horse", {
        "cat": "1st of 4 from the left", "dog dog": "2nd of 4 from the left", "bird bird": "3rd of 4 from the left",
        "horse": "4th of 4 from the left"}),
    ("a red book and a yellow vase", ""),
    ("a cup in the left hand", ""),
    ("a girl with a flower in the left hand", ""),
    ("a car in the right lane", ""),
    ("a cat at the top of the stairs", ""),
    ("a cat in the middle of a room", ""),
    ("a man with a scar over his left eye", ("note", "places a part of something")),
    ("a cat on the left, a cat on the right", ("note", "two places")),
    ("a cat and a dog in a garden", ""),
    ("a cat behind a dog", ("note", "'behind' is about depth")),
    ("a cat in front of a dog", ("note", "'in front of' is about depth")),
    ("a cat to the left of a dog, a dog to the left of a cat", ("note", "contradict")),
    ("a cat above a dog and a dog above a cat", ("note", "contradict")),
    ("a cat on the right, a dog to the right of the cat", ("note", "contradict")),
    ("to the left of a dog", ("note", "cannot tell which objects")),
    ("a cat to the left of it", ("note", "cannot tell which objects")),
]


def places(text: str, groups: str = ""):
    grouping = grouping_from_text(text, groups) if groups else group_prompt(text)
    layout = parse_layout(grouping)
    return layout, {label: describe_band(*layout.band_of(g)) for g, label in enumerate(layout.labels)}


@pytest.mark.parametrize("text, expected", PHRASINGS, ids=[t for t, _ in PHRASINGS])
def test_phrasing_table(text, expected):
    layout, got = places(text)
    if isinstance(expected, tuple):
        assert not layout.active and any(expected[1] in note for note in layout.notes), (got, layout.notes)
    elif expected == "":
        assert not layout.active and not layout.notes, (got, layout.notes)
    else:
        assert layout.active and got == expected, (got, layout.notes)


@pytest.mark.parametrize("text, groups", [("a cup in the left hand", "cup | left hand"),
                                          ("a man on the left bank of a river", "man | left bank river"),
                                          ("a tattoo on the left arm", "tattoo | left arm")])
def test_side_words_as_adjectives_keep_their_groups(text, groups):
    assert group_prompt(text).describe() == groups


def test_the_table_covers_every_required_phrasing():
    assert len(PHRASINGS) >= 40
    needed = ["to the left of", "on the left of", "left of", "right of", "above", "over", "on top of", "below",
              "under", "beneath", "underneath", "beside", "next to", "between", "on the left", "at the top",
              "in the bottom right corner", "in the middle", "behind", "in front of"]
    for phrase in needed:
        assert any(phrase in text for text, _ in PHRASINGS), phrase


def test_a_relation_with_a_side_outside_every_group_says_so():
    layout, _ = places("a cat to the left of a dog", groups="cat")
    assert not layout.active
    assert any("in no group" in note for note in layout.notes)


def test_summary_is_one_line_per_group_then_notes():
    layout, _ = places("a red cube to the left of a blue sphere behind a wall")
    lines = layout.summary_lines()
    assert lines[:2] == ["red cube: left half", "blue sphere: right half"]
    assert "depth" in lines[-1]


# --- the prior on a grid ---------------------------------------------------------------------------------------------
def prior(text, h, w, **kw):
    layout = parse_layout(group_prompt(text))
    return layout_prior(layout, list(range(len(layout.labels))), h, w, **kw)


@pytest.mark.parametrize("h, w", [(64, 64), (48, 96), (96, 40)])
def test_each_group_has_its_mass_where_it_belongs(h, w):
    left, right = prior("a cat to the left of a dog", h, w)
    assert left[:, : w // 2].sum() / left.sum() > 0.93
    assert right[:, w // 2:].sum() / right.sum() > 0.93
    top, bottom = prior("a cat above a dog", h, w)
    assert top[: h // 2].sum() / top.sum() > 0.93
    assert bottom[h // 2:].sum() / bottom.sum() > 0.93
    (middle,) = prior("a lamp in the middle", h, w)
    inside = middle[h // 4: 3 * h // 4, w // 4: 3 * w // 4].sum()
    assert inside / middle.sum() > 0.8


def test_the_feather_has_the_same_width_in_pixels_on_both_axes():
    # a wide grid split left/right and a tall grid split top/bottom: the same ramp, cell for cell
    left, _ = prior("a cat to the left of a dog", 32, 96)
    top, _ = prior("a cat above a dog", 96, 32)
    assert torch.allclose(left[0], top[:, 0], atol=1e-6)
    # the ramp is as wide on a 32 x 96 grid as on a 96 x 32 one, not stretched by the longer side
    ramp = left[0]
    assert ((ramp > 0.05) & (ramp < 0.95)).sum() == ((top[:, 0] > 0.05) & (top[:, 0] < 0.95)).sum()


def test_edges_are_soft_and_the_border_stays_open():
    left, right = prior("a cat to the left of a dog", 64, 64)
    row = left[32]
    assert row[0] > 0.999 and row[-1] < 0.001  # open at the image border, closed far from the band
    steps = row[:-1] - row[1:]
    assert (steps >= -1e-7).all()  # monotone
    assert steps.max() < 0.5  # no hard seam: the seam spreads over several columns
    assert ((row > 0.05) & (row < 0.95)).sum() >= 3
    assert torch.allclose(row[31], right[32][32], atol=1e-6)  # symmetric about the seam
    wider = prior("a cat to the left of a dog", 64, 64, feather=0.1)[0][32]
    assert ((wider > 0.05) & (wider < 0.95)).sum() > ((row > 0.05) & (row < 0.95)).sum()


def test_an_unplaced_group_spans_the_image_and_masks_stay_in_range():
    maps = prior("a cat to the left of a dog and a bird", 40, 56)
    assert torch.equal(maps[2], torch.ones(40, 56))
    assert maps.min() >= 0 and maps.max() <= 1 and maps.dtype == torch.float32


def test_an_empty_grid_is_refused():
    with pytest.raises(ValueError, match="must not be empty"):
        prior("a cat to the left of a dog", 0, 8)


# --- the zero-shot gates with a layout -------------------------------------------------------------------------------
TEXT = "a red book to the left of a yellow vase"
RED_BOOK, YELLOW_VASE = [2, 3], [9, 10]
H, W, HEADS, D, TOKENS = 4, 8, 2, 4, 16


def gates_for(text=TEXT, layout=True, handover="combine"):
    g = group_prompt(text)
    token_groups = [-1] * TOKENS
    for p in RED_BOOK:
        token_groups[p] = 0
    for p in YELLOW_VASE:
        token_groups[p] = 1
    kinds = ["start"] + ["text"] * 10 + ["end"] * (TOKENS - 11)
    gates = ZeroShotGates(g, token_groups, stage="all", start_percent=0.2, partition="aggregate", token_kinds=kinds,
                          layout=parse_layout(g) if layout else None, layout_handover=handover)
    gates.check_fits([])
    return gates


def plant_red_right(scale=4.0):
    """The model's attention puts the red book in the right half and the vase in the left (the wrong layout)."""
    q = torch.zeros(1, H, W, HEADS, D)
    right = torch.arange(W) >= W // 2
    q[:, :, right, 0, 0] = 1.0
    q[:, :, ~right, 0, 1] = 1.0
    k = torch.zeros(1, TOKENS, HEADS, D)
    k[:, RED_BOOK, 0, 0] = scale
    k[:, YELLOW_VASE, 0, 1] = scale
    return q.reshape(1, H * W, HEADS * D), k.reshape(1, TOKENS, HEADS * D)


def info(sigma, handover=None):
    out = {"cond_or_uncond": [0], "sigmas": torch.tensor([sigma]), "original_shape": [1, 4, H, W]}
    if handover is not None:
        out[HANDOVER_SIGMA] = handover
    return out


def red_columns(p):
    kept = (p[0][:, RED_BOOK[0]] > 0.5).view(H, W)
    return {c for c in range(W) if kept[:, c].all()}


def test_with_a_layout_the_gates_start_at_the_first_step_and_hand_over_at_start_percent():
    gates = gates_for()
    assert gates.uses_layout and gates.start_percent == 0.0 and gates.handover_percent == pytest.approx(0.2)
    assert "red book: left half" in gates.describe() and "blue" not in gates.describe()
    plain = gates_for(layout=False)
    assert not plain.uses_layout and plain.start_percent == pytest.approx(0.2) and plain.handover_percent is None


def test_before_the_handover_the_places_decide_against_the_models_attention():
    gates = gates_for()
    q, k = plant_red_right()
    p = gates.attention_probabilities(("input", 4, 0), q, k, HEADS, info(10.0, handover=5.0))
    assert red_columns(p) == set(range(W // 2))


@pytest.mark.parametrize("handover, expected", [("combine", set(range(W // 2))), ("window", set(range(W // 2, W)))])
def test_after_the_handover_combine_keeps_the_places_and_window_follows_the_attention(handover, expected):
    gates = gates_for(handover=handover)
    q, k = plant_red_right()
    for sigma in (10.0, 4.0, 3.0):  # two steps after the handover at 5.0
        p = gates.attention_probabilities(("input", 4, 0), q, k, HEADS, info(sigma, handover=5.0))
    assert red_columns(p) == expected


def test_combine_lets_the_attention_decide_where_places_overlap():
    gates = gates_for(text="a red book to the left of a yellow vase")
    gates.layout.bands = {0: ((0.0, 1.0), (0.0, 1.0)), 1: ((0.5, 1.0), (0.0, 1.0))}  # red anywhere, vase right
    q, k = plant_red_right()
    for sigma in (10.0, 4.0, 3.0):
        p = gates.attention_probabilities(("input", 4, 0), q, k, HEADS, info(sigma, handover=5.0))
    # the red book wins the right half where the model draws it (both may be there); the vase keeps no place on the
    # left, so the red book is kept everywhere
    assert red_columns(p) == set(range(W))


@pytest.mark.parametrize("text", ["a red book and a yellow vase", "a red book with a yellow vase"])
def test_no_spatial_words_gives_the_bits_of_v2(text):
    on, off = gates_for(text=text), gates_for(text=text, layout=False)
    assert on.layout is not None and not on.uses_layout and on.start_percent == off.start_percent
    said = on.describe().splitlines()
    assert "# layout: no spatial words between the groups: no layout" in said  # the node says so
    assert [line for line in said if not line.startswith("# layout:")] == off.describe().splitlines()
    q, k = plant_red_right()
    for sigma in (10.0, 8.0, 6.0, 4.0):
        a = on.attention_probabilities(("input", 4, 0), q, k, HEADS, info(sigma))
        b = off.attention_probabilities(("input", 4, 0), q, k, HEADS, info(sigma))
        assert torch.equal(a, b)


def test_one_group_with_a_place_has_nothing_to_place_against():
    g = group_prompt("a lamp in the middle")
    gates = ZeroShotGates(g, [-1, 0, -1, -1], stage="all", layout=parse_layout(g))
    assert not gates.uses_layout and "nothing to place it against" in gates.describe()


def test_layout_masks_are_each_groups_place():
    gates = gates_for()
    masks = gates.layout_masks(32, 64)
    assert masks.shape == (2, 32, 64)
    assert masks[0, :, :32].mean() > 0.9 and masks[1, :, 32:].mean() > 0.9
    assert gates_for(layout=False).layout_masks(32, 64) is None


def test_a_bad_handover_is_refused():
    with pytest.raises(ValueError, match="layout_handover"):
        gates_for(handover="sometimes")
