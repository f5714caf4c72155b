"""Zero-shot gates v2 on the real host: self-attention masking through the hook discipline (parity when off, the
maths when on, composition, errors), the partition's MASK outputs at image size and the leakage number in the
preview node."""

import pytest
import torch
from test_zeroshot_host import PROMPT, FakeClip, apply, planted_cond, planted_model

pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture(scope="module")
def sdxl_tokenizer(host):
    from comfy.sdxl_clip import SDXLTokenizer

    return SDXLTokenizer()


def build(tokenizer, text=PROMPT, stage="all", start_percent=0.0, **options):
    from comfyui_maskattn.nodes.zeroshot import MaskAttnZeroShotGates

    out = MaskAttnZeroShotGates().build(FakeClip(tokenizer), text, stage, start_percent, "", **options)
    return out["result"][0]


def attn1_replaces(model):
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})


def test_self_attention_off_installs_nothing_and_keeps_parity(host, sdxl_tokenizer):
    from comfyui_maskattn.nodes.hooks import model_sites

    model = host.tiny_sdxl(seed=0)
    pos, neg = host.make_cond(model, seed=0), host.make_cond(model, seed=1)
    base = host.ksample(model, pos, neg, seed=3)
    gates = build(sdxl_tokenizer, self_attention="open")
    assert not attn1_replaces(apply(model, gates))
    # on, but with nothing to separate (one group): containers are installed and the latents are the model's, bit
    # for bit
    one = build(sdxl_tokenizer, "a red book", self_attention="separate_groups")
    patched = apply(model, one)
    assert set(attn1_replaces(patched)) == {s.key for s in model_sites(model)}
    assert torch.equal(host.ksample(patched, pos, neg, seed=3), base)
    assert not attn1_replaces(model)  # the input model is never changed
    # a second Apply with gates that do not mask self-attention removes the containers again
    again = apply(patched, build(sdxl_tokenizer, self_attention="open"))
    assert not attn1_replaces(again)


def test_self_attention_mask_maths_while_sampling(host, sdxl_tokenizer):
    """After a run on the planted model (left half: group 0, right half: group 1), a gated layer's self-attention
    container gives softmax(QK^T/sqrt(d) + B)V with B = -1e4 between the two halves' regions, cond rows only."""
    from comfyui_maskattn.masks.attention import explicit_attention
    from comfyui_maskattn.masks.zeroshot_partition import regions, self_attention_bias

    from comfyui_maskattn.masks.run_state import RUN_STATE_KEY

    model = planted_model(host)
    gates = build(sdxl_tokenizer, self_attention="separate_groups")
    pos, neg = planted_cond(host, model, gates, 0, 1)
    patched = apply(model, gates)
    out = host.ksample(patched, pos, neg, steps=2)
    assert torch.isfinite(out).all()
    key = ("input", 4, 0)
    container = attn1_replaces(patched)[key]
    h = w = 4  # input 4 of the tiny SDXL at 64 px: an 8x8 latent halved once
    density = gates.last_partition.at(h, w, (1, len(gates.groups)))
    region = regions(density)
    assert (region.view(h, w)[:, :2] == 0).all() and (region.view(h, w)[:, 2:] == 1).all()
    heads, d = 2, 8
    q, k, v = (torch.randn(2, h * w, heads * d) for _ in range(3))
    # a later call of the same run (its last sigma: a higher one would start a new run, with no regions yet)
    options = {"n_heads": heads, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([gates.last_partition.sigma]),
               "original_shape": [2, 4, 8, 8], "block": ("input", 4), "block_index": 0,
               RUN_STATE_KEY: patched.model_options["transformer_options"][RUN_STATE_KEY]}
    got = container(q, k, v, dict(options))
    bias = self_attention_bias(region, -1e4, torch.float32)
    expected = torch.cat([explicit_attention(q[:1], k[:1], v[:1], heads),
                          explicit_attention(q[1:], k[1:], v[1:], heads, mask=bias[:, None])])
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got[1], explicit_attention(q[1:], k[1:], v[1:], heads)[0], atol=1e-3)


def test_self_attention_containers_compose_with_other_packs(host, sdxl_tokenizer):
    from test_compose_host import StandInIPAdapterContainer

    from comfyui_maskattn.nodes.gates import MaskAttnApply
    from comfyui_maskattn.nodes.gates import NodeError  # noqa: F401  (the node's error type, for the message)
    from comfyui_maskattn.nodes.containers import MaskAttnSelfAttention
    from comfyui_maskattn.nodes.patch_order import ForeignPatchError

    model = host.tiny_sdxl(seed=0)
    key = ("input", 4, 0)
    seen = []

    def callback(out, q, k, v, extra_options, **kw):
        seen.append(kw["weight"])
        return torch.zeros_like(out)

    other = model.clone()
    other.set_model_attn1_replace(StandInIPAdapterContainer(callback, weight=0.5), *key)
    gates = build(sdxl_tokenizer, self_attention="separate_groups")
    patched = apply(other, gates)
    container = attn1_replaces(patched)[key]
    assert isinstance(container, MaskAttnSelfAttention) and container.kwargs == [{"weight": 0.5}]
    host.ksample(patched, host.make_cond(model, seed=0), host.make_cond(model, seed=1), steps=2)
    assert seen and set(seen) == {0.5}  # the adopted callback still runs
    # a replace that cannot be chained is refused by name, and the input model keeps its own
    blocked = model.clone()
    blocked.set_model_attn1_replace(lambda q, k, v, extra_options: q, *key)
    with pytest.raises(ForeignPatchError, match="self-attention at input.4.0.*self_attention"):
        MaskAttnApply().apply(blocked, gates, 0.5, 1.0, "all", "encoder_decoder", 0.0, 1.0)


def test_masks_node_outputs_each_groups_region_at_image_size(host, sdxl_tokenizer):
    from comfyui_maskattn.nodes.gates import NodeError
    from comfyui_maskattn.nodes.zeroshot import MaskAttnZeroShotMasks

    node = MaskAttnZeroShotMasks()
    model = planted_model(host)
    gates = build(sdxl_tokenizer)
    image = torch.zeros(1, 64, 96, 3)
    out = node.masks(gates, image=image)["result"]  # before any run: empty masks, said so
    assert out[0].shape == (2, 64, 96) and not out[0].any() and "no sampling run" in out[-2]
    pos, neg = planted_cond(host, model, gates, 0, 1)
    latent = host.ksample(apply(model, gates), pos, neg, steps=2, width=96, height=64)
    result = node.masks(gates, latent={"samples": latent})
    masks, m1, m2, m3, m4, leakage, layout = result["result"]
    assert masks.shape == (2, 64, 96) and m1.shape == m2.shape == m3.shape == m4.shape == (1, 64, 96)
    assert layout.shape == (2, 64, 96) and layout.all()  # no spatial words: each group anywhere
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m1[0], masks[0]) and torch.equal(m2[0], masks[1]) and not m3.any() and not m4.any()
    assert (m1[0, :, :40] == 1).all() and (m1[0, :, 56:] == 0).all()  # the left half is group 0's
    assert (m2[0, :, 56:] == 1).all() and (m2[0, :, :40] == 0).all()
    assert "red (red book)" in leakage and "% of its attention inside its region" in leakage
    assert result["ui"]["text"][0].startswith("mask_1: red book\nmask_2: yellow vase")
    # background "to its winning group": the masks tile the image, each region inside its group's tile. An aggregate
    # with a weak middle (no group at the region level there) shows the difference.
    aggregate = torch.ones(1, 2, 4, 6) * 0.2
    aggregate[:, 0, :, :2] = 3.0
    aggregate[:, 1, :, 4:] = 3.0
    aggregate[:, 1, :, 3] = 0.5  # the weak right middle leans to group 1
    gates.last_partition.combined = lambda: aggregate
    regions = node.masks(gates, latent={"samples": latent})["result"][0]
    tiles = node.masks(gates, latent={"samples": latent}, background="to its winning group")["result"][0]
    assert bool((regions.sum(0) == 0).any()) and bool((regions <= tiles).all())
    assert tiles.shape == (2, 64, 96) and bool((tiles.sum(0) == 1).all())
    assert (tiles[1, :, 56:] == 1).all() and (regions[:, :, 40:56] == 0).all()
    with pytest.raises(NodeError, match="Zero-Shot Masks: background must be one of"):
        node.masks(gates, latent={"samples": latent}, background="everywhere")
    with pytest.raises(NodeError, match="Zero-Shot Masks: connect the sampled image or latent"):
        node.masks(gates)
    with pytest.raises(NodeError, match="maskattn: connect the output of 'MaskAttn Zero-Shot Gates'"):
        node.masks(object(), image=image)


def test_gates_stay_as_built_and_a_masks_node_added_later_reads_the_last_run(host, sdxl_tokenizer):
    """A gate source is immutable once built: sampling, the Masks node and Record Gates change none of its fields, and
    nothing is kept per node id. What a run gathers lives on the patched model's run state, one per Apply; a Masks node
    added after a run reads that run's regions and leakage at once, with no second queue."""
    import copy

    from comfyui_maskattn.masks.run_state import RUN_STATE_KEY
    from comfyui_maskattn.nodes import hooks
    from comfyui_maskattn.nodes import zeroshot as zs_nodes
    from comfyui_maskattn.nodes.preview import MaskAttnRecordGates

    assert not hasattr(zs_nodes.MaskAttnZeroShotGates, "IS_CHANGED")
    assert not [name for name, value in vars(zs_nodes).items()
                if not name.isupper() and isinstance(value, (dict, set, list)) and not name.startswith("__")]
    node = zs_nodes.MaskAttnZeroShotGates()
    gates = node.build(FakeClip(sdxl_tokenizer), PROMPT, "all", 0.0, "", unique_id="12",
                       partition="layer")["result"][0]  # v1: its regions come from the aggregate beside it
    fields = {name: value for name, value in vars(gates).items() if not name.startswith("_")}
    snapshot = copy.copy(fields)
    model = planted_model(host)
    pos, neg = planted_cond(host, model, gates, 0, 1)
    first, second = apply(model, gates), apply(model, gates)
    runs = [m.model_options["transformer_options"][RUN_STATE_KEY] for m in (first, second)]
    assert runs[0] is not runs[1] and all(run.source is gates for run in runs)
    latent = host.ksample(first, pos, neg, steps=2, width=96, height=64)
    assert gates.runs.latest is runs[0] and runs[1].partition.past is None  # the other model's run saw nothing
    out = zs_nodes.MaskAttnZeroShotMasks().masks(gates, latent={"samples": latent})["result"]
    assert out[1].any() and out[2].any() and "red (red book)" in out[-2]
    recorded = MaskAttnRecordGates().record(first, "all", "all", False, 16, 8)[0]
    assert hooks.installed_runtime(first).observers == []  # the recorder watches the clone only
    host.ksample(recorded, pos, neg, steps=2, width=96, height=64)
    assert gates.runs.latest is runs[0]  # (a clone shares its model's run state)
    after = {name: value for name, value in vars(gates).items() if not name.startswith("_")}
    assert after.keys() == snapshot.keys() and all(after[n] is snapshot[n] for n in snapshot)
    # a prompt with fewer than two groups has no regions at all
    one = node.build(FakeClip(sdxl_tokenizer), "a red book", "all", 0.0, "", unique_id="78")["result"][0]
    host.ksample(apply(model, one), pos, neg, steps=1, width=96, height=64)
    said = zs_nodes.MaskAttnZeroShotMasks().masks(one, latent={"samples": latent})["result"][-2]
    assert "fewer than two groups" in said


def test_leakage_number_on_planted_attention_and_in_the_preview(host, sdxl_tokenizer):
    from comfyui_maskattn.nodes.preview import MaskAttnPreviewGates, MaskAttnRecordGates

    model = planted_model(host)
    gates = build(sdxl_tokenizer, stage="mid")
    pos, neg = planted_cond(host, model, gates, 0, 1)
    (recorded,) = MaskAttnRecordGates().record(apply(model, gates), "all", "all", False, 8, 64)
    latent = host.ksample(recorded, pos, neg, steps=2)
    report = {w: share for w, _, share in gates.leakage()}
    assert set(report) == {"red", "book", "yellow", "vase"}
    # In closed form: the plant puts direction 3 e_g on group g's half and 3 e_g on its tokens, so head 0 (of 8; the
    # mid layers have 128 channels, 16 per head) gives a token of group g the logit 9/4 from its half and 0 from the
    # other half; the other heads attend evenly. Both halves have as many locations, so the share inside is
    # a_in / (a_in + a_out) with a the head-averaged weights.
    tokens, heads, logit = 77, 8, 9.0 / 4.0
    count = [gates.token_groups.count(g) for g in (0, 1)]
    for word, group in (("red", 0), ("book", 0), ("yellow", 1), ("vase", 1)):
        own, other = count[group], count[1 - group]
        a_in = (torch.tensor(logit).exp() / (own * torch.tensor(logit).exp() + tokens - own) + (heads - 1) / tokens)
        a_out = 1.0 / (other * torch.tensor(logit).exp() + tokens - other) + (heads - 1) / tokens
        assert report[word] == pytest.approx(float(a_in / (a_in + a_out)), rel=1e-4), word
    out = MaskAttnPreviewGates().preview(recorded, "mean", "mean", "layers", "", "gate", 0.6, 0,
                                         latent={"samples": latent})
    assert "attention inside its region: red " in out["ui"]["text"][0]
    from test_preview import viewer_data

    shown = {e["word"]: e["inside"] for e in viewer_data(out)["leakage"]}  # what the canvas viewer reads
    assert shown == {w: round(share, 4) for w, share in report.items()}
