"""The layout from the prompt on the real host: Zero-Shot Gates' `layout` through the KSampler (the places decide
before the handover, bit-identity without spatial words), Zero-Shot Masks' layout output, and the Layout from Prompt
node's MASKs feeding Region Gates."""

import pytest
import torch
from test_zeroshot_host import FakeClip, apply, planted_cond, planted_model, spy_on

pytestmark = pytest.mark.usefixtures("host")

SPATIAL = "a photo of a red book to the right of a yellow vase"


@pytest.fixture(scope="module")
def tokenizer(host):
    from comfy.sdxl_clip import SDXLTokenizer

    return SDXLTokenizer()


def build(tokenizer, text, start_percent=0.5, **options):
    from comfyui_maskattn.nodes.zeroshot import MaskAttnZeroShotGates

    out = MaskAttnZeroShotGates().build(FakeClip(tokenizer), text, "all", start_percent, "", **options)
    return out["result"][0], out["result"][1]


def kept_half(gates, calls, group):
    """Per gated call of the cond row: which half of the latent keeps `group`'s tokens ("left", "right", "both",
    "none")."""
    from comfyui_maskattn.masks.record import latent_hw

    tokens = (torch.tensor(gates.token_groups) == group).nonzero().flatten()
    out = []
    for _key, bias, chunks, _, shape in calls:
        b = bias[chunks.index(0)]
        h, w = latent_hw(b.shape[0], {"original_shape": shape})
        kept = (b == 0).view(h, w, -1)[..., tokens]
        left, right = bool(kept[:, : w // 2].all()), bool(kept[:, w // 2:].all())
        out.append({(True, True): "both", (True, False): "left", (False, True): "right"}.get((left, right), "none"))
    return out


@pytest.mark.parametrize("handover, after", [("combine", "right"), ("window", "left")])
def test_the_places_decide_first_then_the_handover(host, tokenizer, handover, after):
    """The planted model draws group 0 (the red book) on the left; the prompt puts it on the right."""
    model = planted_model(host)
    gates, description = build(tokenizer, SPATIAL)
    gates.layout_handover = handover
    assert "# layout: red book: right half" in description and "# layout: yellow vase: left half" in description
    pos, neg = planted_cond(host, model, gates, 0, 1)
    patched = apply(model, gates)
    assert "maskattn_handover_sigma" in patched.model_options["transformer_options"]
    assert "maskattn_handover_sigma" not in model.model_options.get("transformer_options", {})
    calls = spy_on(patched)
    out = host.ksample(patched, pos, neg, steps=4)
    assert torch.isfinite(out).all()
    halves = kept_half(gates, calls, 0)
    assert halves[0] == "right"  # the first step, before the handover: the prompt's place wins
    assert halves[-1] == after  # the last step: combined with the place, or the attention alone


def test_layout_off_follows_the_attention(host, tokenizer):
    model = planted_model(host)
    gates, description = build(tokenizer, SPATIAL, start_percent=0.0, layout="off")
    assert "layout" not in description
    pos, neg = planted_cond(host, model, gates, 0, 1)
    patched = apply(model, gates)
    calls = spy_on(patched)
    host.ksample(patched, pos, neg, steps=2)
    assert set(kept_half(gates, calls, 0)) == {"left"}


@pytest.mark.parametrize("text", ["a photo of a red book and a yellow vase", "a red book with a yellow vase"])
def test_no_spatial_words_sample_the_bits_of_layout_off(host, tokenizer, text):
    model = host.tiny_sdxl(seed=0)
    pos, neg = host.make_cond(model, seed=0), host.make_cond(model, seed=1)
    on, described_on = build(tokenizer, text, start_percent=0.2)
    off, described_off = build(tokenizer, text, start_percent=0.2, layout="off")
    assert [line for line in described_on.splitlines() if not line.startswith("# layout:")] == \
        described_off.splitlines()
    a = host.ksample(apply(model, on), pos, neg, seed=3, steps=4)
    b = host.ksample(apply(model, off), pos, neg, seed=3, steps=4)
    assert torch.equal(a, b)


def test_zero_shot_masks_output_the_layout(host, tokenizer):
    from comfyui_maskattn.nodes.zeroshot import MaskAttnZeroShotMasks

    gates, _ = build(tokenizer, SPATIAL)
    result = MaskAttnZeroShotMasks().masks(gates, image=torch.zeros(1, 64, 96, 3))["result"]
    layout = result[-1]
    assert layout.shape == (2, 64, 96)
    assert layout[0, :, 48:].mean() > 0.9 and layout[0, :, :48].mean() < 0.1  # red book: right half
    assert layout[1, :, :48].mean() > 0.9
    plain, _ = build(tokenizer, "a red book and a yellow vase")
    assert MaskAttnZeroShotMasks().masks(plain, image=torch.zeros(1, 64, 96, 3))["result"][-1].all()  # anywhere


def layout_node(*args, **kwargs):
    from comfyui_maskattn.nodes.layout import MaskAttnLayoutFromPrompt

    return MaskAttnLayoutFromPrompt().layout(*args, **kwargs)


def test_layout_from_prompt_gives_one_mask_per_object(host, tokenizer):
    out = layout_node("a red cube to the left of a blue sphere, in a studio", 96, 64)
    m1, m2, m3, m4, phrases, summary = out["result"]
    assert m1.shape == m2.shape == m3.shape == m4.shape == (1, 64, 96)
    assert m1[0, :, :48].mean() > 0.9 and m1[0, :, 48:].mean() < 0.1
    assert m2[0, :, 48:].mean() > 0.9 and m2[0, :, :48].mean() < 0.1
    assert not m3.any() and not m4.any()
    assert phrases == "red cube\nblue sphere"
    assert summary.splitlines() == ["red cube: left half", "blue sphere: right half"]
    assert out["ui"]["text"] == [summary]
    with_clip = layout_node("a red cube to the left of a blue sphere, in a studio", 96, 64, clip=FakeClip(tokenizer))
    assert all(torch.equal(a, b) for a, b in zip(with_clip["result"][:4], out["result"][:4]))
    between = layout_node("a dog between a cat and a horse", 120, 64)["result"]
    assert between[0][0, :, 40:80].mean() > 0.9 and between[1][0, :, :40].mean() > 0.9
    assert between[4] == "dog\ncat\nhorse"


def test_layout_from_prompt_says_what_gave_no_layout(host):
    summary = layout_node("a cat behind a dog", 64, 64)["result"][-1]
    assert "depth" in summary
    m1, m2 = layout_node("a cat behind a dog", 64, 64)["result"][:2]
    assert m1.all() and m2.all()  # no layout: every object gets the whole image
    assert "no spatial words" in layout_node("a cat and a dog", 64, 64)["result"][-1]
    assert "contradict" in layout_node("a cat left of a dog, a dog left of a cat", 64, 64)["result"][-1]
    assert "in no group" in layout_node("a cat to the left of a dog", 64, 64, groups="cat")["result"][-1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(text="a cat left of a dog", width=100, height=64), "width is 100; it must be a positive multiple of 8"),
    (dict(text="a cat left of a dog", width=64, height=60), "height is 60"),
    (dict(text="a cat, a dog, a bird, a horse and a cow on the left", width=64, height=64),
     "text: the prompt has 5 objects.*at most 4 masks"),
    (dict(text="a cat left of a dog", width=64, height=64, groups="cat | zebra"), "groups: 'zebra' is not a word"),
])
def test_layout_from_prompt_refuses_bad_input_by_name(host, kwargs, match):
    from comfyui_maskattn.nodes.gates import NodeError

    with pytest.raises(NodeError, match="MaskAttn Layout from Prompt: " + match):
        layout_node(**kwargs)


def test_layout_masks_feed_region_gates(host, tokenizer):
    from comfyui_maskattn.nodes.region import MaskAttnRegionGates

    text = "a red cube to the left of a blue sphere"
    m1, m2, _, _, phrases, _ = layout_node(text, 64, 64)["result"]
    gates, description = MaskAttnRegionGates().build(FakeClip(tokenizer), text, phrases, "all", "keep",
                                                     mask_1=m1, mask_2=m2)["result"]
    assert gates.kind == "region" and "red cube" in description and "blue sphere" in description


@pytest.mark.parametrize("self_attention", ["open", "separate_groups"])
def test_one_maskattn_on_two_models_and_twice_on_one_gives_each_alone(host, tokenizer, self_attention):
    """Gated from the first step, a run's first self-attention must not see the previous run's aggregate."""
    text = "a photo of a red cube on top of a blue sphere, a yellow cat beside them"

    def gates():
        return build(tokenizer, text, start_percent=0.2, end_tokens="hide_in_regions",
                     self_attention=self_attention)[0]

    a, b = host.tiny_sdxl(seed=0), host.tiny_sdxl(seed=1)
    pos, neg = host.make_cond(a, seed=0), host.make_cond(a, seed=1)
    shared = gates()
    assert shared.uses_layout

    def run(model, g):
        return host.ksample(apply(model, g), pos, neg, seed=3, steps=4)

    on_a, on_b, twice = run(a, shared), run(b, shared), run(apply(a, shared), shared)
    assert torch.equal(on_a, run(a, gates()))
    assert torch.equal(on_b, run(b, gates()))
    assert torch.equal(twice, on_a)


def test_the_shipped_layout_workflow_runs_its_masks_into_region_gates(host, tokenizer):
    """workflows/maskattn_sdxl_layout.json: UI and API agree; Layout from Prompt's outputs, run as the executor would,
    feed Region Gates (masks and phrases), and the three prompts are one."""
    import json
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "tests"))
    import workflow_build

    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS as pack

    name = workflow_build.layout_workflow()[0]
    ui = json.loads((repo / "workflows" / f"{name}.json").read_text())
    api = json.loads((repo / "workflows" / workflow_build.api_name(name)).read_text())
    shown = {str(n["id"]): n["type"] for n in ui["nodes"] if n["type"] not in workflow_build.FRONTEND_ONLY_NODES}
    assert shown == {k: v["class_type"] for k, v in api.items()}
    region_ui = next(n for n in ui["nodes"] if n["type"] == "MaskAttnRegionGates")
    assert {"name": "phrases", "type": "STRING", "widget": {"name": "phrases"}} == {
        k: v for k, v in region_ui["inputs"][-1].items() if k != "link"}  # the phrases widget, fed by a link
    by_class = {v["class_type"]: (k, v["inputs"]) for k, v in api.items()}
    layout_id, layout = by_class["MaskAttnLayoutFromPrompt"]
    _, region = by_class["MaskAttnRegionGates"]
    assert layout["text"] == region["text"] == api[by_class["KSampler"][1]["positive"][0]]["inputs"]["text"]
    outputs = layout_node(layout["text"], layout["width"], layout["height"], clip=FakeClip(tokenizer),
                          groups=layout["groups"])["result"]
    args = {k: outputs[v[1]] for k, v in region.items() if isinstance(v, list) and v[0] == layout_id}
    assert set(args) == {"mask_1", "mask_2", "mask_3", "mask_4", "phrases"}
    gates, description = pack["MaskAttnRegionGates"]().build(FakeClip(tokenizer), region["text"], args.pop("phrases"),
                                                              region["stage"], region["end_tokens"], **args)["result"]
    assert gates.phrases == ["red cube", "blue sphere", "wooden table"]
    assert outputs[0][0, :, :400].mean() > 0.95 and outputs[1][0, :, 624:].mean() > 0.95
    assert outputs[2].all() and not outputs[3].any()  # the table is not placed; no fourth object
