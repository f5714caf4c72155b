"""Zero-shot gates on the real host: its CLIP tokenizers, the node, Apply MaskAttn, sampling on tiny models."""

import pytest
import torch

pytestmark = pytest.mark.usefixtures("host")

PROMPT = "a photo of a (red:1.2) book and a yellow vase, masterpiece"


class FakeClip:
    """What the node uses of ComfyUI's CLIP: `tokenize(text, return_word_ids)` and `.tokenizer.clip_<x>`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text, return_word_ids=False):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids)

    def encode_from_tokens(self, tokens, return_pooled=False, **kwargs):  # what CLIP Text Encode calls (both hosts)
        length = sum(len(chunk) for chunk in next(iter(tokens.values())))
        cond, pooled = torch.zeros(1, length, 8), torch.zeros(1, 8)
        if kwargs.get("return_dict"):
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def tokenizers(host):
    from comfy.sd1_clip import SD1Tokenizer
    from comfy.sdxl_clip import SDXLTokenizer

    return {"sdxl": SDXLTokenizer(), "sd1": SD1Tokenizer()}


@pytest.fixture(scope="module")
def node(host):
    from comfyui_maskattn.nodes.zeroshot import MaskAttnZeroShotGates

    return MaskAttnZeroShotGates()


def build(node, tokenizer, text, stage="all", start_percent=0.0, groups=""):
    out = node.build(FakeClip(tokenizer), text, stage, start_percent, groups)
    gates, description, conditioning = out["result"]
    assert out["ui"]["text"] == [description]
    assert conditioning[0][0].shape[1] == len(gates.token_groups)  # the prompt encoded, every chunk
    return gates, description


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
                                           float(info["sigmas"][0]), list(info.get("original_shape", [])))))
    return calls


# --- words -> tokens with the host's own tokenizers ------------------------------------------------------------------
def decoded(tokens, encoder, positions, vocab):
    flat = [item[0] for chunk in tokens[encoder] for item in chunk]
    return "".join(vocab[flat[p]].replace("</w>", "") for p in positions)


LONG = ", ".join(["a wooden chair"] * 40) + " and a red cat"
STRADDLE = ", ".join(["a wooden chair"] * 18) + " and a supercalifragilisticexpialidocious umbrella"


@pytest.mark.parametrize("arch", ["sdxl", "sd1"])
@pytest.mark.parametrize("text", [PROMPT, "a cat BREAK a (dog:0.8), ((running)) next to \\(a\\) tree.", LONG, STRADDLE],
                         ids=["weights", "break-escapes", "231-tokens", "word-across-chunks"])
def test_words_map_to_their_tokens_in_every_encoder(tokenizers, node, arch, text):
    from comfyui_maskattn.masks.prompt import pretokens, token_group_map

    tokenizer = tokenizers[arch]
    gates, _ = build(node, tokenizer, text)
    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)
    assert set(tokens) == ({"g", "l"} if arch == "sdxl" else {"l"})
    vocab = tokenizer.clip_l.inv_vocab
    assert len(gates.token_groups) == 77 * len(tokens["l"])
    _, per_encoder = token_group_map(gates.grouping, tokens, vocab)
    for encoder in tokens:
        for gi, members in enumerate(gates.grouping.groups):
            want = "".join(p for i in members for p in pretokens(gates.grouping.items[i].text))
            where = sorted(p for i in members for p in per_encoder[encoder].get(i, []))
            assert decoded(tokens, encoder, where, vocab) == want
            assert where == [p for p, g in enumerate(gates.token_groups) if g == gi]  # encoders agree


def test_long_prompts_map_into_later_chunks(tokenizers, node):
    gates, description = build(node, tokenizers["sdxl"], LONG)
    assert description.splitlines()[0].endswith("| red cat") and len(gates.token_groups) == 231
    cat = [p for p, g in enumerate(gates.token_groups) if g == len(gates.grouping.groups) - 1]
    assert len(cat) == 2 and all(p >= 154 for p in cat)
    assert all(gates.token_groups[p] == -1 for p in (0, 76, 77, 153, 154))  # start/end tokens of every chunk
    gates, _ = build(node, tokenizers["sdxl"], STRADDLE)
    word = [p for p, g in enumerate(gates.token_groups) if g == len(gates.grouping.groups) - 1]
    assert min(word) < 76 and max(word) > 77  # a long word split across the chunk boundary keeps all its pieces


def test_node_output_and_user_correction(tokenizers, node):
    gates, description = build(node, tokenizers["sdxl"], PROMPT, stage="mid", start_percent=0.2)
    first = description.splitlines()[0]
    assert first == "red book | yellow vase"
    assert "in no group (visible everywhere): a photo of a and a masterpiece" in description
    assert gates.kind == "zero-shot" and gates.stage == "mid" and gates.start_percent == 0.2
    fixed, description = build(node, tokenizers["sdxl"], PROMPT, groups="book | yellow vase masterpiece")
    assert description.splitlines()[0] == "book | yellow vase masterpiece"
    assert sum(g == 0 for g in fixed.token_groups) == 1 and sum(g == 1 for g in fixed.token_groups) == 3
    with pytest.raises(ValueError, match="MaskAttn Zero-Shot Gates: groups: 'green' is not a word of the prompt"):
        build(node, tokenizers["sdxl"], PROMPT, groups="red book | green vase")


def test_node_is_registered(host):
    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert NODE_DISPLAY_NAME_MAPPINGS["MaskAttnZeroShotGates"] == "MaskAttn Zero-Shot Gates"
    cls = NODE_CLASS_MAPPINGS["MaskAttnZeroShotGates"]
    # new outputs go last: links in saved workflows address outputs by slot
    assert cls.CATEGORY == "MaskAttn" and cls.RETURN_TYPES == ("MASKATTN", "STRING", "CONDITIONING")
    inputs = cls.INPUT_TYPES()
    assert set(inputs["required"]) == {"clip", "text", "stage", "start_percent"} and "groups" in inputs["optional"]


def test_clip_of_another_architecture_is_refused(tokenizers, node, host):
    gates, _ = build(node, tokenizers["sdxl"], PROMPT)
    sites = [s for s in __import__("comfyui_maskattn.nodes.hooks", fromlist=["x"]).model_sites(host.tiny_sd15())]
    gates.check_fits(sites)  # a tiny test UNet is no recognised architecture: nothing to compare
    from dataclasses import replace

    sd1_like = [replace(s, context_dim=768) for s in sites]
    with pytest.raises(ValueError, match=r"encoders are \['g', 'l'\].*sd1"):
        gates.check_fits(sd1_like)


# --- sampling ---------------------------------------------------------------------------------------------------------
def test_one_group_prompt_changes_nothing(host, tokenizers, node):
    model = host.tiny_sdxl(seed=0)
    pos, neg = host.make_cond(model, seed=0), host.make_cond(model, seed=1)
    base = host.ksample(model, pos, neg, seed=3)
    gates, description = build(node, tokenizers["sdxl"], "a photo of a cute cat, masterpiece, best quality")
    assert description.splitlines()[0] == "cute cat" and not gates.active
    patched = apply(model, gates)
    calls = spy_on(patched)
    assert torch.equal(host.ksample(patched, pos, neg, seed=3), base)
    assert calls and all(not (bias != 0).any() for _, bias, *_ in calls)  # seen by observers, all kept


def test_two_groups_gate_cond_rows_only_and_respect_start_percent(host, tokenizers, node):
    model = host.tiny_sdxl(seed=0)
    pos, neg = host.make_cond(model, seed=0), host.make_cond(model, seed=1)
    base = host.ksample(model, pos, neg, seed=3, steps=3)
    gates, _ = build(node, tokenizers["sdxl"], PROMPT, stage="mid", start_percent=0.0)
    patched = apply(model, gates)
    calls = spy_on(patched)
    out = host.ksample(patched, pos, neg, seed=3, steps=3)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    from comfyui_maskattn.nodes.hooks import model_sites

    assert {c[0] for c in calls} == {s.key for s in model_sites(model) if s.stage == "mid"}
    for _, bias, chunks, _, _ in calls:
        for i, chunk in enumerate(chunks):
            assert (bias[i] != 0).any() if chunk == 0 else not (bias[i] != 0).any()
    all_steps = {c[3] for c in calls}
    assert len(all_steps) == 3
    # the source's start (0.34 of the schedule) leaves the first step ungated; Apply's own start wins when later
    late, _ = build(node, tokenizers["sdxl"], PROMPT, stage="mid", start_percent=0.34)
    calls = spy_on(patched := apply(model, late))
    host.ksample(patched, pos, neg, seed=3, steps=3)
    assert {c[3] for c in calls} == set(sorted(all_steps)[:2])
    calls = spy_on(patched := apply(model, late, start_percent=0.67))
    host.ksample(patched, pos, neg, seed=3, steps=3)
    assert {c[3] for c in calls} == {min(all_steps)}


def test_sd15_model_with_the_sd1_tokenizer(host, tokenizers, node):
    from comfyui_maskattn.nodes.hooks import model_sites

    model = host.tiny_sd15(seed=1)
    pos, neg = host.make_cond(model, seed=0), host.make_cond(model, seed=1)
    base = host.ksample(model, pos, neg, seed=1)
    gates, _ = build(node, tokenizers["sd1"], PROMPT, stage="mid")
    assert gates.encoders == {"l"}
    patched = apply(model, gates)
    calls = spy_on(patched)
    out = host.ksample(patched, pos, neg, seed=1)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert {c[0] for c in calls} == {s.key for s in model_sites(model) if s.stage == "mid"}


def planted_model(host, seed=0, dtype=torch.float32):
    """A tiny SDXL whose cross-attention is planted: q = the latent features, k = the context (identity
    projections); a patch replaces the features with one direction on the left half of the latent and another on
    the right half, so the left half attends to the tokens whose context carries direction 0 and the right half
    to those that carry direction 1."""
    from comfyui_maskattn.masks.record import latent_hw

    model = host.tiny_sdxl(seed=seed, dtype=dtype)
    with torch.no_grad():
        for module in model.model.diffusion_model.modules():
            attn2 = getattr(module, "attn2", None)
            if attn2 is None:
                continue
            inner, context = attn2.to_k.weight.shape
            attn2.to_q.weight.copy_(torch.eye(inner, dtype=dtype))
            attn2.to_k.weight.zero_()
            attn2.to_k.weight[:context, :context] = torch.eye(context, dtype=dtype)

    def plant(n, context, value, extra_options):
        h, w = latent_hw(n.shape[1], extra_options)
        planted = torch.zeros_like(n)
        grid = planted.view(n.shape[0], h, w, n.shape[2])
        grid[:, :, : w // 2, 0] = 3.0
        grid[:, :, w // 2:, 1] = 3.0
        return planted, context, value

    model.set_model_attn2_patch(plant)
    return model


def planted_cond(host, model, gates, left_group, right_group, neg_tokens=77):
    pos, neg = host.make_cond(model, seed=0), host.make_cond(model, tokens=neg_tokens, seed=1)
    context = torch.zeros_like(pos[0][0])
    for p, g in enumerate(gates.token_groups):
        if g == left_group:
            context[:, p, 0] = 3.0
        elif g == right_group:
            context[:, p, 1] = 3.0
    pos[0][0] = context
    neg[0][0] = torch.zeros_like(neg[0][0])
    return pos, neg


@pytest.mark.parametrize("left,right,neg_tokens", [(0, 1, 77), (1, 0, 77), (0, 1, 154)])
def test_planted_attention_the_right_group_wins_while_sampling(host, tokenizers, node, left, right, neg_tokens):
    """neg_tokens 154: ComfyUI repeats the 77-token prompt to 154 tokens to batch it; both copies are gated."""
    from comfyui_maskattn.masks.record import latent_hw

    model = planted_model(host)
    gates, _ = build(node, tokenizers["sdxl"], PROMPT, stage="all")
    pos, neg = planted_cond(host, model, gates, left, right, neg_tokens)
    patched = apply(model, gates)
    calls = spy_on(patched)
    out = host.ksample(patched, pos, neg, steps=2)
    assert torch.isfinite(out).all() and calls
    index = torch.tensor(gates.token_groups * (neg_tokens // 77))
    for key, bias, chunks, _, shape in calls:
        assert bias.shape[-1] == neg_tokens
        cond = chunks.index(0)
        b = bias[cond]  # [N, T]
        h, w = latent_hw(b.shape[0], {"original_shape": shape})
        kept = (b == 0).view(h, w, -1)
        for group, cols in ((left, slice(0, w // 2)), (right, slice(w // 2, w))):
            tokens = (index == group).nonzero().flatten()
            other = slice(w // 2, w) if cols.start == 0 else slice(0, w // 2)
            assert kept[:, cols][..., tokens].all(), key  # its half keeps it
            assert not kept[:, other][..., tokens].any(), key  # the other half gates it out
        assert kept[..., index == -1].all()  # start, end, padding, words in no group: everywhere
        assert not (bias[chunks.index(1)] != 0).any()  # uncond untouched


def test_the_viewer_records_zero_shot_gates_like_learned_ones(host, tokenizers, node):
    from comfyui_maskattn.masks.record import GateRecorder, site_map
    from comfyui_maskattn.nodes.hooks import installed_runtime

    model = planted_model(host)
    gates, _ = build(node, tokenizers["sdxl"], PROMPT, stage="mid")
    pos, neg = planted_cond(host, model, gates, 0, 1)
    patched = apply(model, gates)
    recorder = GateRecorder(max_side=8)
    runtime = installed_runtime(patched)
    runtime.observers.append(recorder)
    host.ksample(patched, pos, neg, steps=2)
    run = recorder.latest()
    assert run is not None and run.sites and runtime.gates.kind == "zero-shot"
    book = [p for p, g in enumerate(gates.token_groups) if g == 0][0]
    m = site_map(run, run.sites[0])  # [T, h, w]: the red book token is kept on the left half only
    w = m.shape[-1]
    assert (m[book, :, : w // 2] > 0.99).all() and (m[book, :, w // 2:] < 0.01).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_finite(host, tokenizers, node, dtype):
    model = planted_model(host, seed=2, dtype=dtype)
    gates, _ = build(node, tokenizers["sdxl"], PROMPT, stage="all")
    pos, neg = planted_cond(host, model, gates, 0, 1)
    patched = apply(model, gates)
    calls = spy_on(patched)
    out = host.ksample(patched, pos, neg, steps=2)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert any((bias != 0).any() for _, bias, *_ in calls)
    # and on the unplanted model, whose attention is whatever the random weights give
    plain = host.tiny_sdxl(seed=2, dtype=dtype)
    out = host.ksample(apply(plain, gates), host.make_cond(plain, seed=0), host.make_cond(plain, seed=1), steps=2)
    assert torch.isfinite(out).all()


def test_the_viewer_labels_zero_shot_gates_training_free(host, tokenizers, node):
    from comfyui_maskattn.nodes.preview import MaskAttnRecordGates, model_recorder

    model = planted_model(host)
    gates, _ = build(node, tokenizers["sdxl"], PROMPT, stage="mid")
    pos, neg = planted_cond(host, model, gates, 0, 1)
    (recorded,) = MaskAttnRecordGates().record(apply(model, gates), "all", "all", False, 8, 64)
    host.ksample(recorded, pos, neg, steps=2)
    summary = model_recorder(recorded).latest().summary()
    assert summary.startswith("training-free zero-shot gates, run "), summary


def test_the_conditioning_output_is_what_clip_text_encode_makes(host, tokenizers):
    import nodes as comfy_nodes

    from comfyui_maskattn.nodes.zeroshot import MaskAttnZeroShotGates

    clip = FakeClip(tokenizers["sdxl"])
    clip.encode_from_tokens = lambda tokens, return_pooled=False, **kw: _fingerprint(tokens, return_pooled, kw)
    ours = MaskAttnZeroShotGates().build(clip, PROMPT, "mid", 0.2)["result"][2]
    stock = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    assert torch.equal(ours[0][0], stock[0][0]) and ours[0][0].shape[1] == 77


def _fingerprint(tokens, return_pooled, kw):
    ids = torch.tensor([[float(t[0]) for chunk in tokens["g"] for t in chunk]])[..., None]
    cond, pooled = ids.expand(-1, -1, 4).clone(), ids[:, 0]
    if kw.get("return_dict"):
        return {"cond": cond, "pooled_output": pooled}
    return (cond, pooled) if return_pooled else cond


@pytest.mark.parametrize("text,expect", [("", "prompt is empty"), ("a red book", "gives 1 group")])
def test_nothing_to_separate_is_said_on_the_node_and_in_the_log(tokenizers, node, text, expect, caplog):
    with caplog.at_level("WARNING", logger="MaskAttn"):
        gates, description = build(node, tokenizers["sdxl"], text)
    assert not gates.active and gates.nothing_to_separate() and expect in gates.nothing_to_separate()
    assert "NOTHING TO SEPARATE" in description and expect in description
    assert [r for r in caplog.records if expect in r.getMessage()]


def test_a_prompt_not_found_at_sampling_time_is_said_once(tokenizers, node):
    from comfyui_maskattn.masks.zeroshot import build_zero_shot_gates
    from comfyui_maskattn.nodes.tokens import clip_tokens

    heard = []
    gates = build_zero_shot_gates(PROMPT, *clip_tokens(FakeClip(tokenizers["sdxl"]), PROMPT), stage="all",
                                  notice=heard.append)
    q, k = torch.randn(2, 16, 32), torch.randn(2, 100, 32)  # 100 tokens: not this prompt's 77 repeated
    for _ in range(3):
        probs = gates.attention_probabilities(("input", 7, 0), q, k, 2, {"cond_or_uncond": [1, 0]})
        assert torch.equal(probs, torch.ones(2, 16, 100))  # nothing gated
    assert len(heard) == 1 and "not the one being sampled" in heard[0] and "conditioning output" in heard[0]
    # the gates are cached and reused: the next run (its schedule starts high again) says it again, once
    for sigma in (14.6, 7.0, 14.6, 7.0):
        gates.attention_probabilities(("input", 7, 0), q, k, 2, {"cond_or_uncond": [1, 0],
                                                                  "sigmas": torch.tensor([sigma])})
    assert len(heard) == 2
    # an uncond-only call is not a miss: the prompt is simply not in that batch
    heard.clear()
    gates.attention_probabilities(("input", 7, 0), q, k, 2, {"cond_or_uncond": [1, 1],
                                                              "sigmas": torch.tensor([14.6])})
    assert heard == []
