"""MaskAttn Region Gates: phrases -> tokens, masks -> each layer's grid, the keep decision, the node and its errors,
sampling through Apply MaskAttn, the recorder. The first part is pure torch; the host part runs on a real ComfyUI."""

import pytest
import torch

from comfyui_maskattn.masks.gate import gate_bias
from comfyui_maskattn.masks.region import (
    RegionError,
    RegionGates,
    RegionMaskBatchError,
    RegionMaskError,
    RegionPhraseError,
    as_mask,
    coverage,
    split_phrases,
)
from comfyui_maskattn.masks.rows import PROMPT_ROWS_KEY
from comfyui_maskattn.masks.topology import CrossAttnSite
from comfyui_maskattn.masks.prompt import group_prompt
from comfyui_maskattn.masks.zeroshot import ZeroShotGates

# a 9-token prompt: start, 3 words of phrase 0, 1 free word, 2 words of phrase 1, end, padding
PHRASES = [-1, 0, 0, 0, -1, 1, 1, -1, -1]
KINDS = ["start", "text", "text", "text", "text", "text", "text", "end", "end"]


def halves(h=8, w=8, left_cols=None, right_cols=None):
    left, right = torch.zeros(1, h, w), torch.zeros(1, h, w)
    left[..., : left_cols or w // 2] = 1
    right[..., w - (right_cols or w // 2):] = 1
    return left, right


def probabilities(gates, h, w, chunks=(1, 0), per=1, tokens=9):
    b = per * len(chunks)
    q, k = torch.zeros(b, h * w, 8), torch.randn(b, tokens, 8)
    info = {"cond_or_uncond": list(chunks), "activations_shape": [b, 8, h, w]}
    return gates.attention_probabilities(("input", 4, 0), q, k, 1, info)


def test_planted_halves_give_the_exact_bias():
    left, right = halves(16, 16)
    gates = RegionGates(["red cube", "blue sphere"], PHRASES, KINDS, [left, right])
    p = probabilities(gates, 4, 4)  # masks at 16 px, layer grid 4x4: each half is two whole columns
    assert p.shape == (2, 16, 9)
    assert torch.equal(p[0], torch.ones(16, 9))  # the uncond chunk comes first here: untouched
    grid = p[1].view(4, 4, 9)
    assert torch.equal(grid[:, :2, 1:4], torch.ones(4, 2, 3)) and torch.equal(grid[:, 2:, 1:4], torch.zeros(4, 2, 3))
    assert torch.equal(grid[:, 2:, 5:7], torch.ones(4, 2, 2)) and torch.equal(grid[:, :2, 5:7], torch.zeros(4, 2, 2))
    assert torch.equal(grid[..., [0, 4, 7, 8]], torch.ones(4, 4, 4))  # start, free word, end, padding: everywhere
    bias = gate_bias(p, 0.5, -1e4).bias
    expected = torch.zeros(2, 16, 9)
    exp = expected[1].view(4, 4, 9)
    exp[:, 2:, 1:4] = -1e4
    exp[:, :2, 5:7] = -1e4
    assert torch.equal(bias, expected)


def test_end_and_padding_hidden_inside_regions_only():
    left, right = halves(8, 8, left_cols=2, right_cols=2)  # the middle four columns belong to no region
    gates = RegionGates(["a", "b"], PHRASES, KINDS, [left, right], end_tokens="hide_in_regions")
    grid = probabilities(gates, 8, 8, chunks=(0,))[0].view(8, 8, 9)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:, :2] = inside[:, 6:] = True
    assert torch.equal(grid[..., 7][inside], torch.zeros(int(inside.sum())))
    assert torch.equal(grid[..., 8][~inside], torch.ones(int((~inside).sum())))
    assert torch.equal(grid[..., 0], torch.ones(8, 8))  # the start token always stays (no row is ever empty)
    keep = gate_bias(probabilities(gates, 8, 8, chunks=(0,)), 0.5, -1e4).hard
    assert (keep.sum(-1) >= 1).all()


def test_coverage_thresholds_at_half_a_cell_and_keeps_a_small_region_alive():
    mask = torch.zeros(1, 32, 32)
    mask[:, 0:6, 0:6] = 1  # 6x6 px: at 4x4 cells (8 px) it covers 36/64 of one cell
    cov = coverage(mask, 4, 4)
    assert cov[0, 0, 0] == 1.0 and cov.sum() == 1.0  # the most covered cell is raised to 1, the others are empty
    mask = torch.zeros(1, 32, 32)
    mask[:, 0:2, 0:2] = 1  # 4 px of one 64-px cell: below half a cell, but the region keeps its best cell
    assert coverage(mask, 4, 4)[0, 0, 0] == 1.0
    mask = torch.zeros(1, 32, 32)
    mask[:, 0:8, 0:12] = 1  # one full cell and half of the next one
    cov = coverage(mask, 4, 4)
    assert cov[0, 0, 0] == 1.0 and cov[0, 0, 1] == 0.5 and cov[0, 0, 2] == 0.0


def test_one_mask_per_image_and_a_batch_that_fits_neither():
    left, right = halves()
    per_image_a = torch.stack([left[0], right[0]])  # image 0: phrase 0 on the left; image 1: on the right
    per_image_b = torch.stack([right[0], left[0]])
    gates = RegionGates(["a", "b"], PHRASES, KINDS, [per_image_a, per_image_b])
    p = probabilities(gates, 8, 8, chunks=(1, 0), per=2)  # rows: uncond 0, uncond 1, cond 0, cond 1
    assert torch.equal(p[:2], torch.ones(2, 64, 9))
    assert torch.equal(p[2].view(8, 8, 9)[:, :4, 1], torch.ones(8, 4))
    assert torch.equal(p[3].view(8, 8, 9)[:, 4:, 1], torch.ones(8, 4))
    assert torch.equal(p[3].view(8, 8, 9)[:, :4, 1], torch.zeros(8, 4))
    with pytest.raises(RegionMaskBatchError, match="MaskAttn Region Gates: mask_1..mask_2 hold 2 images but the "
                                                   "KSampler runs 3; give one mask per phrase for all images, or one "
                                                   "per image"):
        probabilities(gates, 8, 8, chunks=(1, 0), per=3)


def test_rows_found_by_the_host_are_gated_each_with_its_images_masks():
    """Behind a batch-expanding pack the host adapter names the prompt's rows (PROMPT_ROWS_KEY): only those are
    gated, the i-th with image i's masks, even where the batch does not split into the sampler's chunks."""
    left, right = halves()
    gates = RegionGates(["a", "b"], PHRASES, KINDS, [torch.stack([left[0], right[0]]), torch.stack([right[0],
                                                                                                    left[0]])])
    plain = probabilities(gates, 8, 8, chunks=(1, 0), per=2)  # image 0 at row 2, image 1 at row 3
    for b, rows in ((8, [2, 3]), (7, [2, 5])):  # uncond 2 + base 2 + region rows; 7 rows split into no 2 chunks
        q, k = torch.zeros(b, 64, 8), torch.randn(b, 9, 8)
        info = {"cond_or_uncond": [1, 0], "activations_shape": [b, 8, 8, 8], PROMPT_ROWS_KEY: torch.tensor(rows)}
        p = gates.attention_probabilities(("input", 4, 0), q, k, 1, info)
        assert torch.equal(p[rows[0]], plain[2]) and torch.equal(p[rows[1]], plain[3])
        others = [r for r in range(b) if r not in rows]
        assert torch.equal(p[others], torch.ones(len(others), 64, 9))
        none = dict(info, **{PROMPT_ROWS_KEY: torch.tensor([], dtype=torch.long)})  # no row of this prompt
        assert torch.equal(gates.attention_probabilities(("input", 4, 0), q, k, 1, none), torch.ones(b, 64, 9))


def test_the_keep_map_is_made_once_per_grid_and_row_layout():
    left, right = halves()
    gates = RegionGates(["a", "b"], PHRASES, KINDS, [left, right])
    first = probabilities(gates, 8, 8, chunks=(1, 0), per=2)
    assert probabilities(gates, 8, 8, chunks=(1, 0), per=2) is first  # the next layer / step: no rebuild
    swapped = probabilities(gates, 8, 8, chunks=(0, 1), per=2)
    assert swapped is not first and torch.equal(swapped[:2], first[2:]) and torch.equal(swapped[2:], first[:2])
    assert probabilities(gates, 4, 4, chunks=(1, 0), per=2).shape == (4, 16, 9)


def test_contexts_of_another_length_are_left_alone():
    left, right = halves()
    gates = RegionGates(["a", "b"], PHRASES, KINDS, [left, right])
    assert torch.equal(probabilities(gates, 8, 8, chunks=(0,), tokens=10), torch.ones(1, 64, 10))


def test_bad_masks_and_phrases_are_refused():
    left, right = halves()
    with pytest.raises(RegionError, match="mask_2 is empty"):
        RegionGates(["a", "b"], PHRASES, KINDS, [left, torch.zeros(1, 8, 8)])
    with pytest.raises(RegionError, match="2 phrase\\(s\\) but 1 mask"):
        RegionGates(["a", "b"], PHRASES, KINDS, [left])
    with pytest.raises(RegionError, match="different batch sizes"):
        RegionGates(["a", "b"], PHRASES, KINDS, [left.expand(2, 8, 8), right.expand(3, 8, 8)])
    with pytest.raises(RegionError, match="map to no token"):
        RegionGates(["a", "b", "c"], PHRASES, KINDS, [left, right, right])
    assert split_phrases("red cube | blue sphere\n\n# a comment\n  green   cone ") == ["red cube", "blue sphere",
                                                                                   "green cone"]
    with pytest.raises(RegionMaskError, match="mask_1 has shape"):
        as_mask(torch.ones(8), "mask_1")
    with pytest.raises(RegionPhraseError, match="map to no token"):
        RegionGates(["a", "b", "c"], PHRASES, KINDS, [left, right, right])
    assert torch.equal(as_mask(torch.ones(1, 1, 4, 4) * 2, "mask_1"), torch.ones(1, 4, 4))  # [B, 1, H, W], clamped


@pytest.mark.parametrize("source", ["region", "zero-shot"])
def test_one_gate_source_applied_to_two_models_keeps_each_models_stages(source):
    """The same MASKATTN checked against two architectures where one layer key sits at different stages: the second
    check does not change what the first model's sites are covered by."""
    def site(number, stage, context):
        return CrossAttnSite("input", number, 0, 64, context, 4, 1, 0, -1, stage)

    first = [site(4, "mid", 96), site(7, "high", 96)]
    second = [site(4, "high", 128), site(7, "mid", 128)]
    if source == "region":
        left, right = halves()
        gates = RegionGates(["a", "b"], PHRASES, KINDS, [left, right], stage="mid")
    else:
        gates = ZeroShotGates(group_prompt("a cat and a dog"), [-1] * 77, stage="mid")
    gates.check_fits(first)
    assert gates.covers(("input", 4, 0)) and not gates.covers(("input", 7, 0))
    gates.check_fits(second)
    assert not gates.covers(("input", 4, 0)) and gates.covers(("input", 7, 0))  # the model just checked
    assert gates.covers(("input", 4, 0), first) and not gates.covers(("input", 7, 0), first)
    assert gates.covers(("input", 7, 0), second) and not gates.covers(("input", 4, 0), second)


# --- on the host ------------------------------------------------------------------------------------------------------
PROMPT = "a photo of a red cube to the left of a blue sphere, studio light"


class FakeClip:
    """What the node uses of ComfyUI's CLIP: `tokenize(text, return_word_ids)` and `.tokenizer.clip_<x>`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text, return_word_ids=False):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids)


@pytest.fixture(scope="module")
def sdxl_clip(host):
    from comfy.sdxl_clip import SDXLTokenizer

    return FakeClip(SDXLTokenizer())


def node_build(clip, text=PROMPT, phrases="red cube | blue sphere", stage="all", end_tokens="keep", **masks):
    from comfyui_maskattn.nodes.region import MaskAttnRegionGates

    if not masks:
        left, right = halves(64, 64)
        masks = {"mask_1": left, "mask_2": right}
    out = MaskAttnRegionGates().build(clip, text, phrases, stage, end_tokens, **masks)
    gates, description = out["result"]
    assert out["ui"]["text"] == [description]
    return gates, description


def test_phrases_map_to_their_tokens_in_both_sdxl_encoders(sdxl_clip, host):
    from comfyui_maskattn.nodes.tokens import clip_vocab

    gates, description = node_build(sdxl_clip)
    tokens = sdxl_clip.tokenize(PROMPT, return_word_ids=True)
    for encoder in ("g", "l"):
        vocab = clip_vocab(sdxl_clip, encoder)
        words = {g: "".join(vocab[int(tokens[encoder][0][p][0])].replace("</w>", " ") for p, gg in
                            enumerate(gates.token_phrases) if gg == g).strip() for g in (0, 1)}
        assert words == {0: "red cube", 1: "blue sphere"}
    assert gates.kinds[0] == "start" and gates.kinds[-1] == "end" and gates.kinds.count("start") == 1
    first_end = gates.kinds.index("end")
    assert all(k == "end" for k in gates.kinds[first_end:]) and len(gates.kinds) == 77
    assert description.splitlines()[0] == "red cube | blue sphere" and "mask_2 64x64" in description


def test_node_errors_name_the_input_and_the_fix(sdxl_clip, host):
    from comfyui_maskattn.nodes.gates import NodeError

    left, right = halves(64, 64)
    with pytest.raises(NodeError, match="MaskAttn Region Gates: phrases: 'green' is not a word of the prompt.*Use "
                                        "words of the prompt"):
        node_build(sdxl_clip, phrases="green cube | blue sphere")
    with pytest.raises(NodeError, match="need mask_1..mask_2.*mask_2 not connected.*Connect a MASK"):
        node_build(sdxl_clip, mask_1=left)
    with pytest.raises(NodeError, match="mask_3 connected but there is no phrase 3"):
        node_build(sdxl_clip, mask_1=left, mask_2=right, mask_3=right)
    with pytest.raises(NodeError, match="mask_2 is empty.*Connect a mask with a white"):
        node_build(sdxl_clip, mask_1=left, mask_2=torch.zeros(1, 64, 64))
    with pytest.raises(NodeError, match="phrases is empty"):
        node_build(sdxl_clip, phrases="  \n ")
    with pytest.raises(NodeError, match="'cube' occurs 1 time"):
        node_build(sdxl_clip, phrases="red cube | cube")
    with pytest.raises(NodeError, match="mask_1 contains NaN.*Check the node that makes mask_1"):
        node_build(sdxl_clip, mask_1=torch.full((1, 64, 64), float("nan")), mask_2=right)
    with pytest.raises(NodeError, match="no CLIP connected \\(clip input\\). Connect your checkpoint loader's CLIP"):
        node_build(None)


def test_node_is_registered(host):
    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert NODE_DISPLAY_NAME_MAPPINGS["MaskAttnRegionGates"] == "MaskAttn Region Gates"
    spec = NODE_CLASS_MAPPINGS["MaskAttnRegionGates"].INPUT_TYPES()
    assert [k for k in spec["optional"]] == ["mask_1", "mask_2", "mask_3", "mask_4"]


def apply(model, gates, **kw):
    from comfyui_maskattn.nodes.gates import MaskAttnApply

    args = dict(threshold=0.5, strength=1.0, stage="all", placement="encoder_decoder", start_percent=0.0,
                end_percent=1.0)
    args.update(kw)
    return MaskAttnApply().apply(model, gates, **args)[0]


def spy_on(model):
    from comfyui_maskattn.nodes.hooks import installed_runtime

    calls = []
    installed_runtime(model).observers.append(
        lambda key, r, info: calls.append((key, r.bias.detach().clone(), list(info.get("cond_or_uncond", [0])),
                                           list(info.get("original_shape", [])))))
    return calls


@pytest.mark.parametrize("neg_tokens", [77, 154])
def test_sampling_gates_each_phrase_to_its_half_on_every_layer(sdxl_clip, host, neg_tokens):
    """neg_tokens 154: ComfyUI repeats the 77-token prompt to 154 tokens to batch it; both copies are gated."""
    from comfyui_maskattn.masks.record import latent_hw
    from comfyui_maskattn.nodes.hooks import installed_runtime, model_sites

    model = host.tiny_sdxl(seed=0)
    pos, neg = host.make_cond(model, seed=0), host.make_cond(model, tokens=neg_tokens, seed=1)
    base = host.ksample(model, pos, neg, seed=3, steps=2)
    gates, _ = node_build(sdxl_clip)
    patched = apply(model, gates)
    calls = spy_on(patched)
    out = host.ksample(patched, pos, neg, seed=3, steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert installed_runtime(model) is None  # the input model is untouched
    assert {c[0] for c in calls} == {s.key for s in model_sites(model)}
    index = torch.tensor(gates.token_phrases * (neg_tokens // 77))
    for key, bias, chunks, shape in calls:
        b = bias[chunks.index(0)]
        h, w = latent_hw(b.shape[0], {"original_shape": shape})
        kept = (b == 0).view(h, w, -1)
        for phrase, mine, other in ((0, slice(0, w // 2), slice(w // 2, w)), (1, slice(w // 2, w), slice(0, w // 2))):
            tokens = (index == phrase).nonzero().flatten()
            assert kept[:, mine][..., tokens].all() and not kept[:, other][..., tokens].any(), key
        assert kept[..., index == -1].all()
        assert not (bias[chunks.index(1)] != 0).any()


def test_stage_and_end_token_choices_reach_the_sampler(sdxl_clip, host):
    from comfyui_maskattn.nodes.hooks import model_sites

    model = host.tiny_sdxl(seed=0)
    pos, neg = host.make_cond(model, seed=0), host.make_cond(model, seed=1)
    left, right = halves(64, 64)
    left[..., :8] = 0  # the first and last 8 px columns belong to no region
    right[..., 56:] = 0
    gates, _ = node_build(sdxl_clip, stage="mid", end_tokens="hide_in_regions", mask_1=left, mask_2=right)
    calls = spy_on(patched := apply(model, gates))
    host.ksample(patched, pos, neg, steps=1, width=256, height=256)  # mid stage: an 8x8 grid
    assert {c[0] for c in calls} == {s.key for s in model_sites(model) if s.stage == "mid"}
    end = torch.tensor([k == "end" for k in gates.kinds])
    for _, bias, chunks, _ in calls:
        b = bias[chunks.index(0)]
        hidden = (b[:, end] != 0).all(dim=-1)
        assert 0 < int(hidden.sum()) < b.shape[0]  # hidden inside the regions, visible outside


def test_the_viewer_records_region_gates(sdxl_clip, host):
    from comfyui_maskattn.masks.record import GateRecorder, site_map
    from comfyui_maskattn.nodes.hooks import installed_runtime

    model = host.tiny_sdxl(seed=0)
    gates, _ = node_build(sdxl_clip, stage="mid")
    patched = apply(model, gates)
    recorder = GateRecorder(max_side=8)
    runtime = installed_runtime(patched)
    runtime.observers.append(recorder)
    host.ksample(patched, host.make_cond(model, seed=0), host.make_cond(model, seed=1), steps=2)
    run = recorder.latest()
    assert run is not None and run.sites and runtime.gates.kind == "region"
    red = gates.token_phrases.index(0)
    m = site_map(run, run.sites[0])  # [T, h, w]: "red" is kept on the left half only
    w = m.shape[-1]
    assert (m[red, :, : w // 2] > 0.99).all() and (m[red, :, w // 2:] < 0.01).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_finite(sdxl_clip, host, dtype):
    model = host.tiny_sdxl(seed=2, dtype=dtype)
    gates, _ = node_build(sdxl_clip, end_tokens="hide_in_regions")
    calls = spy_on(patched := apply(model, gates))
    out = host.ksample(patched, host.make_cond(model, seed=0), host.make_cond(model, seed=1), steps=2)
    assert torch.isfinite(out).all() and any((bias != 0).any() for _, bias, *_ in calls)
