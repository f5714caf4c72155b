"""Zero-shot gates without a host: prompt -> entity groups, the editable group text, planted attention."""

import pytest
import torch

from comfyui_maskattn.masks.gate import GateResult
from comfyui_maskattn.masks.runtime import GateRuntime
from comfyui_maskattn.masks.prompt import (
    GroupingError, group_prompt, grouping_from_text, pretokens, token_group_map, weighted_segments,
)
from comfyui_maskattn.masks.zeroshot import ZeroShotGates

LONG = ", ".join(["a wooden chair"] * 30) + " and a red cat"

# prompt -> the grouping line the node shows ("" = no group: nothing gated)
GROUPING_TABLE = [
    ("a red book and a yellow vase", "red book | yellow vase"),
    ("a red book, a yellow vase", "red book | yellow vase"),
    ("A Red Book AND a Yellow Vase.", "Red Book | Yellow Vase"),
    ("a (red:1.2) book and a ((yellow)) vase", "red book | yellow vase"),
    ("(a red book:1.3), [a yellow vase]", "red book | yellow vase"),
    ("a red book and a yellow vase, (masterpiece:1.2), best quality, 8k", "red book | yellow vase"),
    ("a cat next to a dog", "cat | dog"),
    ("a cat on the left of a dog", "cat | dog"),
    ("a cat to the right of a dog", "cat | dog"),
    ("a blue cup in front of a pink teapot", "blue cup | pink teapot"),
    ("a red cube on top of a blue sphere beside a green cone", "red cube | blue sphere | green cone"),
    ("a man with a hat", "man | hat"),
    ("a photo of a cat and a dog", "cat | dog"),
    ("a portrait of a woman wearing a red dress", "woman | red dress"),
    ("oil painting of a man riding a horse, art by greg rutkowski", "man | horse"),
    ("a cat in the style of van gogh", "cat"),
    ("a house by the lake", "house | lake"),
    ("a castle surrounded by tall trees, concept art by artgerm", "castle | tall trees"),
    ("a black and white cat and a brown dog", "black white cat | brown dog"),
    # a noun that is also an attribute word ("square") after an article is an entity (CompBench's captions)
    ("a red circle to the left of a blue square", "red circle | blue square"),
    ("a green diamond above an orange square", "green diamond | orange square"),
    ("a square table and a round mirror", "square table | round mirror"),
    ("a big, fluffy dog and a tiny cat", "big fluffy dog | tiny cat"),
    ("a dog, brown, and a cat", "dog brown | cat"),
    ("a cat BREAK a dog", "cat | dog"),
    ("a cat, sitting on a sofa BREAK a lamp, golden light", "cat | sofa | lamp"),
    ("an astronaut | a horse", "astronaut | horse"),
    ("an astronaut\na horse\n", "astronaut | horse"),
    ("a cat; a dog! a bird?", "cat | dog | bird"),
    ("two cats and three dogs", "two cats | three dogs"),
    ("a man's hat and a woman's scarf", "man's hat | woman's scarf"),
    ("a t-shirt with a smiley face", "t-shirt | smiley face"),
    ("a cup of coffee on the left of a croissant", "cup coffee | croissant"),
    ("a glass of \\(orange\\) juice and a lemon", "glass orange juice | lemon"),
    ("embedding:mycat and a dog", "embedding:mycat | dog"),
    ("a cat", "cat"),
    ("masterpiece, best quality, highly detailed, cinematic lighting, 4k", ""),
    ("", ""),
    ("a cat, a cat", "cat cat"),
    ("a red apple and a green apple", "red apple | green apple"),
    ("((a blue bird)) sitting above (a yellow flower:0.8)", "blue bird | yellow flower"),
    ("a white dog and a black cat playing in the snow, photorealistic, 35mm", "white dog | black cat | snow"),
    ("a majestic lion, golden hour, national geographic photo", "majestic lion"),
    ("A tiger drinking from a river at dawn. Misty jungle background.", "tiger | river | jungle background"),
    ("a cyberpunk city street at night, neon signs, rain, a man in a trench coat",
     "cyberpunk city street | neon signs | man | trench coat"),
    ("a glass of water, 2.5 apples, shot at f1.8, 35mm", "glass water | 2.5 apples"),
    (LONG, " ".join(["wooden chair"] * 30) + " | red cat"),
]


@pytest.mark.parametrize("prompt,expected", GROUPING_TABLE, ids=[p[:40] or "empty" for p, _ in GROUPING_TABLE])
def test_grouping_table(prompt, expected):
    grouping = group_prompt(prompt)
    assert grouping.describe() == expected
    # the line the node shows is a valid correction that reproduces the grouping
    again = grouping_from_text(prompt, expected)
    assert again.groups == grouping.groups


def test_table_is_large_enough():
    assert len(GROUPING_TABLE) >= 30


def test_words_outside_groups_are_listed():
    g = group_prompt("a photo of a red book next to a vase, masterpiece")
    assert g.describe() == "red book | vase"
    assert g.ungrouped_words() == ["a", "photo", "of", "a", "next", "to", "a", "masterpiece"]


@pytest.mark.parametrize("text,expected", [
    ("a (red:1.2) book", [("a ", 1.0), ("red", 1.2), (" book", 1.0)]),
    ("((yellow))", [("yellow", pytest.approx(1.21))]),
    ("(style: anime)", [("style: anime", pytest.approx(1.1))]),
    ("\\(not weighted\\)", [("(not weighted)", 1.0)]),
    ("(a (b:1.5) c:0.5)", [("a ", 0.5), ("b", 1.5), (" c", 0.5)]),
    ("unclosed (paren", [("unclosed (paren", 1.0)]),
])
def test_weighted_segments_read_comfyui_emphasis(text, expected):
    assert weighted_segments(text) == expected


def test_user_grouping_overrides_and_repeated_words():
    prompt = "a red book and a red vase next to a blue book"
    g = grouping_from_text(prompt, "red vase | blue book\n# a comment\nred book")
    words = [[g.items[i].text for i in members] for members in g.groups]
    assert words == [["red", "vase"], ["blue", "book"], ["red", "book"]]
    # the occurrence nearest the group's other words is used: "red" of the vase, "book" of "blue book"
    idx = [i for i, it in enumerate(g.items) if it.norm == "red"]
    assert g.groups[0][0] == idx[1] and g.groups[2][0] == idx[0]
    assert g.describe() == "red vase | blue book | red book"


def test_user_grouping_with_weights_and_any_word():
    g = grouping_from_text("a (red:1.3) book and a vase", "(a red:1.1) book | vase")
    assert g.describe() == "a red book | vase"


@pytest.mark.parametrize("groups,message", [
    ("red book | green vase", "'green' is not a word of the prompt"),
    ("red book | red vase", "'red' occurs 1 time"),
])
def test_user_grouping_errors_name_the_word(groups, message):
    with pytest.raises(GroupingError, match=message):
        grouping_from_text("a red book and a yellow vase", groups)


def test_pretokens_follow_clip_pieces():
    assert pretokens("A t-shirt, 12px café's") == ["a", "t", "-", "shirt", ",", "1", "2", "px", "cafÃ©", "'s"]


# --- token mapping on a hand-made tokenization ---------------------------------------------------------------------
VOCAB = {49406: "<|startoftext|>", 49407: "<|endoftext|>", 0: "!", 1: "a</w>", 2: "red</w>", 3: "book</w>",
         4: "and</w>", 5: "yel", 6: "low</w>", 7: "vase</w>", 8: ",</w>"}


def hand_tokens(ids, with_embedding=False, pad=49407):
    chunk = [(49406, 1.0, 0)] + [(t, 1.0, w) for t, w in ids]
    if with_embedding:
        chunk += [(torch.randn(8), 1.0, 9), (torch.randn(8), 1.0, 9)]
    chunk += [(49407, 1.0, 0)]
    chunk += [(pad, 1.0, 0)] * (77 - len(chunk))
    return [chunk]


def test_token_map_from_a_hand_made_tokenization_with_split_words_and_embeddings():
    prompt = "a red book, and a yellow vase embedding:pot"
    ids = [(1, 1), (2, 2), (3, 3), (8, 3), (4, 4), (1, 5), (5, 6), (6, 6), (7, 7)]
    tokens = {"l": hand_tokens(ids, True), "g": hand_tokens(ids, True, pad=0)}
    g = group_prompt(prompt)
    assert g.describe() == "red book | yellow vase embedding:pot"
    m, _ = token_group_map(g, tokens, VOCAB)
    assert len(m) == 77
    assert [p for p, x in enumerate(m) if x == 0] == [2, 3]  # the comma (4) belongs to no group
    assert [p for p, x in enumerate(m) if x == 1] == [7, 8, 9, 10, 11]  # yel+low, vase, both embedding vectors
    assert m[0] == m[12] == m[13] == -1  # start, end, padding


def test_encoders_that_disagree_leave_the_position_ungated():
    g = group_prompt("a red book and a vase")
    tokens = {"l": hand_tokens([(1, 1), (2, 2), (3, 3), (4, 4), (1, 5), (7, 6)]),
              "g": hand_tokens([(1, 1), (2, 2), (4, 3), (3, 4), (1, 5), (7, 6)])}
    m, _ = token_group_map(g, tokens, VOCAB)
    assert m[2] == 0 and m[6] == 1 and m[3] == -1 and m[4] == -1


# --- planted attention ---------------------------------------------------------------------------------------------
KEY = ("input", 7, 0)
RED_BOOK, YELLOW_VASE = [2, 3], [7, 8]


def two_group_gates(length=77, partition="layer", **options):
    """v1 (partition "layer") unless asked: these tests read one call's partition; v2's memory is tested in
    test_zeroshot_v2.py."""
    g = group_prompt("a red book and a yellow vase")
    token_groups = [-1] * length
    for p in RED_BOOK:
        token_groups[p] = 0
    for p in YELLOW_VASE:
        token_groups[p] = 1
    gates = ZeroShotGates(g, token_groups, stage="all", start_percent=0.0, partition=partition, **options)
    gates.check_fits([])
    return gates


def planted_qk(batch=1, h=4, w=4, tokens=77, heads=2, d=4, left=RED_BOOK, right=YELLOW_VASE, scale=4.0):
    """q, k where the left half of the h x w grid attends to `left` tokens and the right half to `right` tokens
    (head 0 only; head 1 attends uniformly)."""
    q = torch.zeros(batch, h, w, heads, d)
    q[:, :, : w // 2, 0, 0] = 1.0
    q[:, :, w // 2:, 0, 1] = 1.0
    k = torch.zeros(batch, tokens, heads, d)
    k[:, left, 0, 0] = scale
    k[:, right, 0, 1] = scale
    return q.reshape(batch, h * w, heads * d), k.reshape(batch, tokens, heads * d)


def columns(mask, h=4, w=4):
    """[N] bool over the grid -> set of column indices where it holds."""
    return {i % w for i in torch.nonzero(mask).flatten().tolist()}


def test_planted_attention_the_right_group_wins_each_half():
    gates = two_group_gates()
    q, k = planted_qk()
    p = gates.attention_probabilities(KEY, q, k, 2, {"cond_or_uncond": [0]})
    assert p.shape == (1, 16, 77)
    kept = p[0] > 0.5
    for t in RED_BOOK:
        assert columns(kept[:, t]) == {0, 1}
    for t in YELLOW_VASE:
        assert columns(kept[:, t]) == {2, 3}
    others = [t for t in range(77) if t not in RED_BOOK + YELLOW_VASE]
    assert torch.equal(p[0][:, others], torch.ones(16, len(others)))  # start, end, padding, "a", "and": kept
    # swapped plant, swapped winner
    q, k = planted_qk(left=YELLOW_VASE, right=RED_BOOK)
    kept = gates.attention_probabilities(KEY, q, k, 2, {"cond_or_uncond": [0]})[0] > 0.5
    assert columns(kept[:, RED_BOOK[0]]) == {2, 3} and columns(kept[:, YELLOW_VASE[0]]) == {0, 1}


def test_a_neglected_group_still_wins_where_its_attention_concentrates():
    """Group A draws more attention than B at every location; B concentrates on the right half. Raw attention mass
    would give A everything (deepening the neglect of B); per-group spatial densities give B its half."""
    gates = two_group_gates()
    h = w = 4
    q = torch.zeros(1, h, w, 2, 4)
    q[..., 0, 0] = 1.0  # head 0: every location attends to A
    q[:, :, w // 2:, 1, 1] = 1.0  # head 1: the right half attends to B
    k = torch.zeros(1, 77, 2, 4)
    k[:, RED_BOOK, 0, 0] = 6.0
    k[:, YELLOW_VASE, 1, 1] = 3.0
    q, k = q.reshape(1, 16, 8), k.reshape(1, 77, 8)
    attention = torch.softmax(q.view(1, 16, 2, 4).transpose(1, 2) @ k.view(1, 77, 2, 4).permute(0, 2, 3, 1) / 2, -1)
    raw = attention.mean(1)
    assert (raw[0][:, RED_BOOK].sum(-1) > raw[0][:, YELLOW_VASE].sum(-1)).all()  # A dominates everywhere
    kept = gates.attention_probabilities(KEY, q, k, 2, {})[0] > 0.5
    assert columns(kept[:, YELLOW_VASE[0]]) == {2, 3} and columns(kept[:, RED_BOOK[0]]) == {0, 1}


def test_uncond_rows_repeated_contexts_and_other_prompts():
    gates = two_group_gates()
    q, k = planted_qk(batch=3)
    p = gates.attention_probabilities(KEY, q, k, 2, {"cond_or_uncond": [1, 0, 0]})
    assert torch.equal(p[0], torch.ones(16, 77))  # uncond: never gated
    assert (p[1] < 0.5).any() and torch.equal(p[1], p[2])
    # a 77-token prompt repeated to 154 tokens (batched with a longer negative prompt): both copies gated alike
    q, k = planted_qk(tokens=154)
    k[:, 77:] = k[:, :77]
    p = gates.attention_probabilities(KEY, q, k, 2, {"cond_or_uncond": [0]})
    assert torch.equal(p[0, :, :77] > 0.5, p[0, :, 77:] > 0.5) and (p[0] < 0.5).any()
    # a second chunk that is another prompt (ConditioningConcat): only the first chunk is ours
    k[:, 77:] = torch.randn(1, 77, 8)
    p = gates.attention_probabilities(KEY, q, k, 2, {"cond_or_uncond": [0]})
    assert (p[0, :, :77] < 0.5).any() and torch.equal(p[0, :, 77:], torch.ones(16, 77))
    # a context that is not this prompt's length repeated: a prompt we hold no groups for
    q, k = planted_qk(tokens=80)
    assert torch.equal(gates.attention_probabilities(KEY, q, k, 2, {}), torch.ones(1, 16, 80))


def test_ties_keep_every_group_and_one_group_gates_nothing():
    gates = two_group_gates()
    q, k = planted_qk()
    p = gates.attention_probabilities(KEY, torch.zeros_like(q), k, 2, {})  # uniform attention: a tie everywhere
    assert (p > 0.5).all()
    one = ZeroShotGates(group_prompt("a red book"), [-1, -1, 0, 0] + [-1] * 73)
    assert not one.active
    assert torch.equal(one.attention_probabilities(KEY, q, k, 2, {}), torch.ones(1, 16, 77))


def test_threshold_trades_strictness():
    gates = two_group_gates()
    q, k = planted_qk(scale=1.0)  # a weak plant: the loser's share is not tiny
    p = gates.attention_probabilities(KEY, q, k, 2, {})[0]
    assert ((p > 0.5).sum() < (p > 0.3).sum()) and ((p > 0.9).sum() < (p > 0.5).sum())


def test_runtime_turns_them_into_a_bias_and_observers_see_them():
    gates = two_group_gates()
    seen = []
    runtime = GateRuntime(gates=gates, sites=frozenset({KEY}), observers=[lambda key, r, info: seen.append((key, r))])
    q, k = planted_qk(batch=2)
    result = runtime.compute_from_attention(KEY, q, k, 2, None, {"cond_or_uncond": [1, 0]})
    assert isinstance(result, GateResult) and seen and seen[0][0] == KEY
    bias = result.bias
    assert torch.equal(bias[0], torch.zeros(16, 77))
    assert set(bias[1].unique().tolist()) == {0.0, -1.0e4}
    assert (bias[1][:, [0, 1, 4, 5, 6, 9, 76]] == 0).all()  # start, "a", "and", end/padding stay visible
    assert gates.kind == "zero-shot" and gates.label == "training-free" and gates.needs_attention


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_probabilities(dtype):
    gates = two_group_gates()
    q, k = planted_qk(scale=300.0)  # logits far outside the fp16 softmax comfort zone
    p = gates.attention_probabilities(KEY, q.to(dtype), k.to(dtype), 2, {})
    assert p.dtype == torch.float32 and torch.isfinite(p).all() and (p < 0.5).any()


def test_covers_follows_the_stage_of_the_model_it_was_fitted_to():
    from comfyui_maskattn.masks.topology import CrossAttnSite

    def site(block, number, stage):
        return CrossAttnSite(block, number, 0, 64, 64, 4, 1, 0, -1, stage)

    gates = ZeroShotGates(group_prompt("a cat and a dog"), [-1] * 77, stage="mid")
    gates.check_fits([site("input", 4, "high"), site("input", 7, "mid")])
    assert gates.covers(("input", 7, 0)) and not gates.covers(("input", 4, 0)) and not gates.covers(("input", 1, 0))
