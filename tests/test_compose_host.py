"""MaskAttn beside the attention packs users stack with it, inside a real ComfyUI (tiny models, the real KSampler).

The other packs appear as restatements written here from what they do (never their code): the attention couple of
cgem156 / ComfyUI-ppm / prompt-control (a batch-expanding attn2_patch and an attn2_output_patch) and IPAdapter_plus's
attention container (callbacks, `.add()`, per-device kwargs built by `.to(device)`). LoRA, ControlNet, SAG and PAG
are ComfyUI's own classes and nodes. Every test checks which rows were gated with which tokens, by recomputing the
gate from the n/context the attention actually ran.
"""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from test_apply_host import GateSpy, apply, conds, make_gates

pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture(scope="module")
def pack(host):
    from comfyui_maskattn.nodes import gates as gate_nodes
    from comfyui_maskattn.nodes import hooks

    return gate_nodes, hooks


@pytest.fixture(scope="module")
def sdxl(host):
    return host.tiny_sdxl(seed=0)


def runtime_of(model):
    from comfyui_maskattn.nodes.hooks import installed_runtime

    return installed_runtime(model)


def site_key(extra_options):
    block = extra_options["block"]
    return (block[0], block[1], extra_options.get("block_index", 0))


# --- restatement: the attention couple ------------------------------------------------------------------------------
class StandInAttentionCouple:
    """What the attention couples do (cgem156's, ComfyUI-ppm's, prompt-control's), restated from their behaviour.

    attn2_patch: each cond chunk of the batch becomes 1 + R chunks: the base prompt's rows, then one copy of the
    latent rows per region with that region's prompt as the context; uncond chunks stay. Texts are repeated along the
    tokens to their least common multiple. attn2_output_patch: the base and region outputs of each cond chunk are
    blended into one by the region masks (normalised to sum to 1 per location, resized to the layer's latent size);
    the batch returns to the sampler's layout. `expanded` keeps (site, n, context, row kinds) of every call.
    """

    def __init__(self, region_contexts, masks):
        self.regions = list(region_contexts)  # [1, T_r, D] each
        self.masks = masks / masks.sum(0, keepdim=True)  # [1 + R, H, W]
        self.expanded = []

    def __deepcopy__(self, memo):  # (real couples are closures, which clones share)
        return self

    def attn2_patch(self, n, context, value, extra_options):
        chunks = extra_options["cond_or_uncond"]
        per = n.shape[0] // len(chunks)
        tokens = math.lcm(context.shape[1], *(r.shape[1] for r in self.regions))
        ns, cs, kinds, spans = [], [], [], []
        for i, kind in enumerate(chunks):
            n_i, c_i = n[i * per:(i + 1) * per], context[i * per:(i + 1) * per]
            c_i = c_i.repeat(1, tokens // c_i.shape[1], 1)
            spans.append((kind, sum(x.shape[0] for x in ns)))
            if kind == 1:
                ns.append(n_i)
                cs.append(c_i)
                kinds += ["uncond"] * per
                continue
            ns.append(n_i.repeat(1 + len(self.regions), 1, 1))
            cs.append(torch.cat([c_i] + [r.to(c_i).repeat(per, tokens // r.shape[1], 1) for r in self.regions]))
            kinds += ["base"] * per + [f"region{j}" for j in range(len(self.regions)) for _ in range(per)]
        n_out, c_out = torch.cat(ns), torch.cat(cs)
        extra_options["stand_in_couple"] = (per, spans)
        if extra_options.get("block") is not None:
            self.expanded.append((site_key(extra_options), n_out, c_out, kinds))
        return n_out, c_out, c_out

    def attn2_output_patch(self, out, extra_options):
        per, spans = extra_options["stand_in_couple"]
        _, _, height, width = extra_options["original_shape"]
        while height * width > out.shape[1]:  # the layer's latent size (stride-2 downsampling rounds up)
            height, width = -(-height // 2), -(-width // 2)
        masks = F.interpolate(self.masks[:, None].to(out), size=(height, width), mode="nearest")
        masks = masks.reshape(masks.shape[0], 1, -1, 1)  # [1 + R, 1, N, 1]
        rows = []
        for kind, start in spans:
            if kind == 1:
                rows.append(out[start:start + per])
            else:
                parts = out[start:start + per * masks.shape[0]].reshape(masks.shape[0], per, *out.shape[1:])
                rows.append((parts * masks).sum(0))
        return torch.cat(rows)


def with_couple(model, couple):
    """Apply the stand-in couple as the couple nodes do: clone, then set both patches."""
    model = model.clone()
    model.set_model_attn2_patch(couple.attn2_patch)
    model.set_model_attn2_output_patch(couple.attn2_output_patch)
    return model


def make_couple(host, model, seed=10):
    """Two regions (left / right halves of the base) with prompts of 77 and 154 tokens (base: 77)."""
    left, right = host.make_cond(model, tokens=77, seed=seed), host.make_cond(model, tokens=154, seed=seed + 1)
    masks = torch.zeros(3, 8, 8)
    masks[0] = 0.25
    masks[1, :, :4] = 1.0
    masks[2, :, 4:] = 1.0
    return StandInAttentionCouple([left[0][0], right[0][0]], masks)


def recompute(runtime, key, n, context, rows):
    """The straightforward gate (the spec line by line) on the rows the attention ran."""
    with torch.inference_mode():  # (the recorded tensors are inference tensors, as sampling made them)
        return runtime.compute(key, n, context, rows).bias


def check_rows_gated_with_their_own_text(runtime, couple, spy, gate_uncond):
    """Every gate call saw the couple's expanded batch: its bias is the gate recomputed from the rows attention ran
    (each region row with its own prompt), uncond rows untouched when gate_uncond is off."""
    records = [r for r in couple.expanded if r[0] in runtime.sites]
    assert len(spy.calls) == len(records) > 0
    regions_differ = False
    for (key, shape, bias, _), (rkey, n, context, kinds) in zip(spy.calls, records):
        assert key == rkey and shape == (n.shape[0], n.shape[1], context.shape[1])
        rows = None if gate_uncond else torch.tensor([kind != "uncond" for kind in kinds])
        assert torch.equal(bias, recompute(runtime, key, n, context, rows)), key
        for r, kind in enumerate(kinds):
            if kind.startswith("region"):
                region = couple.regions[int(kind[len("region"):])]
                assert torch.equal(context[r], region[0].repeat(context.shape[1] // region.shape[1], 1))
                base = next(b for b, other in enumerate(kinds) if other == "base" and torch.equal(n[b], n[r]))
                regions_differ |= not torch.equal(bias[r], bias[base])  # same latent row, other text
            if kind == "uncond":
                assert bool((bias[r] != 0).any()) == gate_uncond
            else:
                assert (bias[r] != 0).any()
    assert regions_differ  # the region rows were gated with their own tokens, not the base prompt's


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("gate_uncond", [True, False])
def test_attention_couple_before_or_after_apply_gives_the_same_latents_and_gates_each_region_with_its_own_text(
        host, pack, sdxl, gate_uncond, batch):
    pos, neg = conds(host, sdxl)
    gates = make_gates(sdxl)
    couple_first, maskattn_first = make_couple(host, sdxl), make_couple(host, sdxl)
    model_a = apply(pack, with_couple(sdxl, couple_first), gates, gate_uncond=gate_uncond)
    model_b = with_couple(apply(pack, sdxl, gates, gate_uncond=gate_uncond), maskattn_first)
    spies = GateSpy(), GateSpy()
    runtime_of(model_a).observers.append(spies[0])
    runtime_of(model_b).observers.append(spies[1])
    latents_a = host.ksample(model_a, pos, neg, steps=2, batch=batch)
    latents_b = host.ksample(model_b, pos, neg, steps=2, batch=batch)
    assert torch.equal(latents_a, latents_b)
    for model, couple, spy in zip((model_a, model_b), (couple_first, maskattn_first), spies):
        check_rows_gated_with_their_own_text(runtime_of(model), couple, spy, gate_uncond)

    couple_only = host.ksample(with_couple(sdxl, make_couple(host, sdxl)), pos, neg, steps=2, batch=batch)
    assert not torch.equal(latents_a, couple_only)
    ones = make_gates(sdxl, mode="ones")
    for model in (apply(pack, with_couple(sdxl, make_couple(host, sdxl)), ones, gate_uncond=gate_uncond),
                  with_couple(apply(pack, sdxl, ones, gate_uncond=gate_uncond), make_couple(host, sdxl))):
        assert torch.equal(host.ksample(model, pos, neg, steps=2, batch=batch), couple_only)


def area_and_mask_conds(host, model):
    """A positive prompt made of an area cond (left half) and a mask cond (a square), as ComfyUI's nodes make them."""
    import nodes

    left = nodes.ConditioningSetArea().append(host.make_cond(model, seed=20), width=32, height=64, x=0, y=0,
                                              strength=1.0)[0]
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1.0
    square = nodes.ConditioningSetMask().append(host.make_cond(model, seed=21), mask=mask, strength=1.0,
                                                set_cond_area="default")[0]
    return nodes.ConditioningCombine().combine(left, square)[0]


@pytest.mark.parametrize("gate_uncond", [True, False])
def test_attention_couple_with_area_and_mask_conds_in_both_orders(host, pack, sdxl, gate_uncond):
    pos, neg = area_and_mask_conds(host, sdxl), host.make_cond(sdxl, seed=22)
    gates = make_gates(sdxl)
    couples = make_couple(host, sdxl), make_couple(host, sdxl)
    models = (apply(pack, with_couple(sdxl, couples[0]), gates, gate_uncond=gate_uncond),
              with_couple(apply(pack, sdxl, gates, gate_uncond=gate_uncond), couples[1]))
    spies = GateSpy(), GateSpy()
    for model, spy in zip(models, spies):
        runtime_of(model).observers.append(spy)
    latents = [host.ksample(model, pos, neg, steps=2) for model in models]
    assert torch.equal(latents[0], latents[1])
    for model, couple, spy in zip(models, couples, spies):
        check_rows_gated_with_their_own_text(runtime_of(model), couple, spy, gate_uncond)
        assert len({c[1][1] for c in spy.calls}) > 2  # area crops and the full latent ran as separate batches


# --- restatement: IPAdapter_plus's attention container ---------------------------------------------------------------
class StandInIPAdapterContainer:
    """What IPAdapter_plus puts at an attn2 key, restated from its behaviour: base attention plus one term per
    callback inside its sigma window; `.add()` joins another callback; `.to(device)` keeps a per-device copy of every
    callback's kwargs (tensors moved there) for ComfyUI's multi-GPU work units, and calls read the copy for q's
    device. (IPAdapter skips the CPU, where its weights already are; this stand-in builds the copy for every device so
    that the CPU host exercises the mechanism.)"""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]
        self.multigpu_kwargs = {}

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for k, v in kwargs.items():
            setattr(self, k, v)

    def get_multigpu_kwargs(self, device):
        return self.multigpu_kwargs.get(device, self.kwargs)

    def to(self, device, *args, **kwargs):
        if not isinstance(device, torch.device) or device in self.multigpu_kwargs:
            return self
        self.multigpu_kwargs[device] = [
            {k: v.to(device).clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            for kw in self.kwargs]
        return self

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"][0]) if "sigmas" in extra_options else 1e9
        per_device = self.get_multigpu_kwargs(q.device)
        for i, cb in enumerate(self.callback):
            if self.kwargs[i]["sigma_end"] <= sigma <= self.kwargs[i]["sigma_start"]:
                out = out + cb(out, q, k, v, extra_options, **per_device[i])
        return out.to(q.dtype)


ADAPTER_SITES = [("input", 7, 0), ("input", 8, 1), ("output", 1, 0), ("middle", 0, 0)]


def stand_in_ipadapter(model, calls, weight=0.3):
    """Apply the stand-in adapter as IPAdapter does: clone, copy the dicts, join or create the container."""
    model = model.clone()

    def extra_term(out, q, k, v, extra_options, weight=None, **_):
        calls.append((site_key(extra_options), q.shape[0], weight.data_ptr()))
        return weight * torch.tanh(q)

    to = model.model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
    for key in ADAPTER_SITES:
        kw = dict(weight=torch.tensor(weight), sigma_start=1e9, sigma_end=0.0)
        if key in to["patches_replace"]["attn2"]:
            to["patches_replace"]["attn2"][key].add(extra_term, **kw)
        else:
            to["patches_replace"]["attn2"][key] = StandInIPAdapterContainer(extra_term, **kw)
    model.model_options["transformer_options"] = to
    return model


@pytest.mark.parametrize("gate_uncond", [True, False])
def test_ipadapter_container_and_attention_couple_in_every_order(host, pack, sdxl, gate_uncond):
    pos, neg = conds(host, sdxl)
    gates = make_gates(sdxl)
    steps = {
        "couple": lambda m, couple, calls: with_couple(m, couple),
        "ipadapter": lambda m, couple, calls: stand_in_ipadapter(m, calls),
        "maskattn": lambda m, couple, calls: apply(pack, m, gates, gate_uncond=gate_uncond),
    }
    results = {}
    for order in itertools.permutations(steps):
        model, couple, calls = sdxl, make_couple(host, sdxl), []
        for name in order:
            model = steps[name](model, couple, calls)
        spy = GateSpy()
        runtime_of(model).observers.append(spy)
        results[order] = host.ksample(model, pos, neg, steps=2)
        check_rows_gated_with_their_own_text(runtime_of(model), couple, spy, gate_uncond)
        expanded = {r[0]: r[1].shape[0] for r in couple.expanded}
        assert calls and {c[0] for c in calls} == set(ADAPTER_SITES)
        assert all(rows == expanded[key] for key, rows, _ in calls)  # the adapter ran on the couple's batch
    first = next(iter(results.values()))
    for order, latents in results.items():
        assert torch.equal(latents, first), order


def test_adopted_container_keeps_its_own_device_handling(host, pack, sdxl):
    """An adopted container's `.to(device)` runs on MaskAttn's container (ComfyUI calls it when it loads the model)
    and the callbacks get its per-device kwargs; neither the upstream model's dict nor a clone's is shared."""
    pos, neg = conds(host, sdxl)
    calls = []
    adapted = stand_in_ipadapter(sdxl, calls)
    model = apply(pack, adapted, make_gates(sdxl))
    host.ksample(model, pos, neg, steps=1)
    device = torch.device("cpu")
    replaces = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    for key in ADAPTER_SITES:
        container = replaces[key]
        assert device in container.multigpu_kwargs, key  # the adopted .to() ran on our container
        copies = {kw["weight"].data_ptr() for kw in container.multigpu_kwargs[device]}
        originals = {kw["weight"].data_ptr() for kw in container.kwargs}
        seen = {ptr for site, _, ptr in calls if site == key}
        assert seen and seen <= copies and not seen & originals, key
    upstream = adapted.model_options["transformer_options"]["patches_replace"]["attn2"][ADAPTER_SITES[0]]
    assert upstream.multigpu_kwargs == {}
    clone = apply(pack, adapted, make_gates(sdxl)).clone()
    clone.model_patches_to(torch.device("meta"))
    fresh = clone.model_options["transformer_options"]["patches_replace"]["attn2"][ADAPTER_SITES[0]]
    assert torch.device("meta") in fresh.multigpu_kwargs and torch.device("meta") not in upstream.multigpu_kwargs


# --- ComfyUI's own classes: LoRA, ControlNet, SAG, PAG --------------------------------------------------------------
class InputRecorder:
    """An attn2_patch of another pack that changes nothing and keeps what it saw: MaskAttn's gate runs after it, on
    the same n/context, whatever the order of the nodes."""

    def __init__(self):
        self.seen = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        if extra_options.get("block") is not None:
            self.seen.append((site_key(extra_options), n, context, list(extra_options["cond_or_uncond"])))
        return n, context, value


def with_recorder(model, recorder):
    model = model.clone()
    model.set_model_attn2_patch(recorder)
    return model


def check_gate_inputs(runtime, recorder, spy, gate_uncond=True):
    records = [r for r in recorder.seen if r[0] in runtime.sites]
    assert len(spy.calls) == len(records) > 0
    for (key, _, bias, chunks), (rkey, n, context, rchunks) in zip(spy.calls, records):
        assert key == rkey and chunks == rchunks
        per = n.shape[0] // len(chunks)
        rows = None if gate_uncond else torch.tensor([c == 0 for c in chunks for _ in range(per)])
        assert torch.equal(bias, recompute(runtime, key, n, context, rows)), key


def tiny_lora(model, scale=0.5, seed=3):
    """A LoRA state dict (ComfyUI's `lora_unet_*` names) on the key and query projections of two gated layers."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.model.diffusion_model.state_dict()
    lora = {}
    for name in ("input_blocks.7.1.transformer_blocks.0.attn2.to_k",
                 "output_blocks.1.1.transformer_blocks.0.attn2.to_q"):
        out_dim, in_dim = sd[name + ".weight"].shape
        key = "lora_unet_" + name.replace(".", "_")
        lora[key + ".lora_up.weight"] = torch.randn(out_dim, 4, generator=gen) * scale
        lora[key + ".lora_down.weight"] = torch.randn(4, in_dim, generator=gen) * scale
        lora[key + ".alpha"] = torch.tensor(4.0)
    return lora


def with_lora(model, lora):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]


def test_lora_patched_model_under_maskattn_in_both_orders(host, pack, sdxl):
    pos, neg = conds(host, sdxl)
    lora = tiny_lora(sdxl)
    gates = make_gates(sdxl)
    plain, lora_only = host.ksample(sdxl, pos, neg), host.ksample(with_lora(sdxl, lora), pos, neg)
    assert not torch.equal(plain, lora_only)
    recorders = InputRecorder(), InputRecorder()
    models = (apply(pack, with_recorder(with_lora(sdxl, lora), recorders[0]), gates),
              with_recorder(with_lora(apply(pack, sdxl, gates), lora), recorders[1]))
    spies = GateSpy(), GateSpy()
    latents = []
    for model, spy in zip(models, spies):
        runtime_of(model).observers.append(spy)
        latents.append(host.ksample(model, pos, neg))
    assert torch.equal(latents[0], latents[1])
    for model, recorder, spy in zip(models, recorders, spies):
        check_gate_inputs(runtime_of(model), recorder, spy)
    assert not torch.equal(latents[0], lora_only)
    # open gates: exactly the LoRA model (its patched projections run inside MaskAttn's container)
    assert torch.equal(host.ksample(apply(pack, with_lora(sdxl, lora), make_gates(sdxl, mode="ones")), pos, neg),
                       lora_only)


def tiny_controlnet(host, seed=4):
    """A tiny random ControlNet (ComfyUI's cldm.ControlNet and controlnet.ControlNet) matching tiny_sdxl."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    from cli.tiny_models import init_random_weights_, sdxl_unet_config

    config = sdxl_unet_config(32, (0, 2, 2), 64)
    config.pop("out_channels")
    config.update(num_head_channels=16, hint_channels=3, dtype=torch.float32)
    for name in ("use_temporal_attention", "use_temporal_resblock"):
        config.pop(name)
    control = comfy.cldm.cldm.ControlNet(operations=comfy.ops.disable_weight_init, device="cpu", **config)
    init_random_weights_(control, seed)
    return comfy.controlnet.ControlNet(control, load_device=torch.device("cpu"))


def test_controlnet_conditioned_model_under_maskattn(host, pack, sdxl):
    import nodes

    pos, neg = conds(host, sdxl)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    pos_c, neg_c = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, tiny_controlnet(host), hint, 1.0, 0.0,
                                                                    1.0)[:2]
    plain, controlled = host.ksample(sdxl, pos, neg), host.ksample(sdxl, pos_c, neg_c)
    assert not torch.equal(plain, controlled)
    recorder = InputRecorder()
    model = with_recorder(apply(pack, sdxl, make_gates(sdxl)), recorder)
    spy = GateSpy()
    runtime_of(model).observers.append(spy)
    gated = host.ksample(model, pos_c, neg_c)
    check_gate_inputs(runtime_of(model), recorder, spy)  # the gate read the control-shifted features
    gated_without_control = host.ksample(apply(pack, sdxl, make_gates(sdxl)), pos, neg)
    assert not torch.equal(gated, controlled) and not torch.equal(gated, gated_without_control)
    assert torch.equal(host.ksample(apply(pack, sdxl, make_gates(sdxl, mode="ones")), pos_c, neg_c), controlled)


def guidance_node(name):
    """ComfyUI's SAG / PAG node as a function model -> model (V1 `patch` on older hosts, V3 `execute` on newer)."""
    import importlib

    module = {"SelfAttentionGuidance": "comfy_extras.nodes_sag", "PerturbedAttentionGuidance": "comfy_extras.nodes_pag"}
    try:
        node = getattr(importlib.import_module(module[name]), name)
    except (ImportError, AttributeError):
        pytest.skip(f"this ComfyUI has no {name} node")
    args = {"SelfAttentionGuidance": dict(scale=0.5, blur_sigma=2.0), "PerturbedAttentionGuidance": dict(scale=3.0)}
    if hasattr(node, "patch"):
        return lambda model: node().patch(model, **args[name])[0]
    return lambda model: node.execute(model, **args[name]).result[0]


@pytest.mark.parametrize("name", ["SelfAttentionGuidance", "PerturbedAttentionGuidance"])
@pytest.mark.parametrize("gate_uncond", [True, False])
def test_sag_and_pag_extra_passes_are_gated_like_the_sampler_pass(host, pack, sdxl, name, gate_uncond):
    guide = guidance_node(name)
    pos, neg = conds(host, sdxl)
    guided = host.ksample(guide(sdxl), pos, neg)
    assert not torch.equal(guided, host.ksample(sdxl, pos, neg))
    gates = make_gates(sdxl)
    recorders, spies, latents = (InputRecorder(), InputRecorder()), (GateSpy(), GateSpy()), []
    models = (guide(with_recorder(apply(pack, sdxl, gates, gate_uncond=gate_uncond), recorders[0])),
              apply(pack, with_recorder(guide(sdxl), recorders[1]), gates, gate_uncond=gate_uncond))
    for model, spy in zip(models, spies):
        runtime_of(model).observers.append(spy)
        latents.append(host.ksample(model, pos, neg))
    assert torch.equal(latents[0], latents[1]) and not torch.equal(latents[0], guided)
    # PAG re-runs the positive prompt, SAG the negative one; ComfyUI labels both passes [0] (a one-cond batch), so
    # gate_uncond = off gates them as it gates cond rows
    extra_pass = [0]
    for model, recorder, spy in zip(models, recorders, spies):
        check_gate_inputs(runtime_of(model), recorder, spy, gate_uncond)
        assert any(chunks == extra_pass for _, _, _, chunks in spy.calls)  # the guidance pass went through the gate
        assert any(len(chunks) == 2 for _, _, _, chunks in spy.calls)  # and the sampler's cond + uncond batch
    ones = make_gates(sdxl, mode="ones")
    assert torch.equal(host.ksample(apply(pack, guide(sdxl), ones, gate_uncond=gate_uncond), pos, neg), guided)


# --- a combination that cannot work fails early, by name ------------------------------------------------------------
def test_a_batch_change_after_the_gate_is_an_error_naming_both_nodes_and_the_order(host, pack, sdxl):
    """A pack that rebuilds the patch list as a plain list with its own patch last bypasses MaskAttn's place at the
    end: the first gated layer stops with MaskAttn's message, not a shape error from inside the attention."""
    pos, neg = conds(host, sdxl)
    couple = make_couple(host, sdxl)
    model = apply(pack, sdxl, make_gates(sdxl)).clone()
    patches = model.model_options["transformer_options"]["patches"]
    patches["attn2_patch"] = list(patches["attn2_patch"]) + [couple.attn2_patch]  # (a plain list: order is theirs)
    model.set_model_attn2_output_patch(couple.attn2_output_patch)
    with pytest.raises(RuntimeError, match=r"Apply MaskAttn: the cross-attention at \S+ ran on 4 rows and 154 tokens, "
                                           r"but MaskAttn's gate saw 2 rows and 77 tokens.*StandInAttentionCouple"
                                           r".*Apply MaskAttn after that node"):
        host.ksample(model, pos, neg, steps=1)


def test_patch_list_keeps_maskattn_at_the_ends_through_every_way_comfyui_and_packs_grow_it(host, pack, sdxl):
    import copy

    from comfyui_maskattn.nodes.gate_patch import MaskAttnGatePatch, MaskAttnLayoutPatch
    from comfyui_maskattn.nodes.patch_order import OrderedPatchList

    model = apply(pack, sdxl, make_gates(sdxl))
    patches = model.model_options["transformer_options"]["patches"]

    def ours_at_ends(items):
        items = list(items)
        return isinstance(items[0], MaskAttnLayoutPatch) and isinstance(items[-1], MaskAttnGatePatch)

    a, b, c = (lambda *x: x), (lambda *x: x), (lambda *x: x)
    clone = model.clone()
    clone.set_model_attn2_patch(a)  # old + [new]
    grown = clone.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert ours_at_ends(grown) and ours_at_ends(grown[:]) and list(grown)[1] is a
    front = [b] + grown
    front.append(c)
    front.extend([a])
    front.insert(len(front), b)
    front += [c]
    assert ours_at_ends(front) and ours_at_ends(front.copy()) and ours_at_ends(copy.deepcopy(front))
    moved = OrderedPatchList([list(front)[0], b, c, list(front)[-1]])
    gate = list(moved)[-1]
    moved[1] = gate  # index assignments (ModelPatcher.model_patches_to stores what each patch's .to() returns)
    moved[-1] = b
    assert ours_at_ends(moved) and list(list.__iter__(moved)) == list(moved)  # kept in order: iteration needs no sort
    theirs = [p for p in front if not isinstance(p, (MaskAttnLayoutPatch, MaskAttnGatePatch))]
    assert theirs[:3] == [b, a, c]
    assert ours_at_ends(patches["attn2_patch"]) and len(patches["attn2_patch"]) == 2  # the source model is unchanged
    try:
        import comfy.patcher_extension as extension
    except ImportError:
        return
    merged = extension.merge_nested_dicts({"patches": {"attn2_patch": [a]}}, {"patches": {"attn2_patch": grown}},
                                          copy_dict1=False)  # 0.3.64's merge of hook patches at each sampling call
    assert ours_at_ends(merged["patches"]["attn2_patch"]) and ours_at_ends(extension.copy_nested_dicts(
        {"attn2_patch": grown})["attn2_patch"])


def test_rows_found_after_an_expansion_are_the_same_tensors_for_the_same_layout(host):
    from comfyui_maskattn.nodes.gate_patch import PatchOrderError, expanded_rows
    from comfyui_maskattn.nodes.patch_order import ForeignPatchError

    first = expanded_rows((False, True, True), (False, True, False), "cpu")
    again = expanded_rows((False, True, True), (False, True, False), "cpu")
    assert first[0] is again[0] and first[1] is again[1]  # a CUDA graph keyed on them is reused, not recaptured
    assert first[0].tolist() == [False, True, True] and first[1].tolist() == [1]
    assert PatchOrderError.__module__ == ForeignPatchError.__module__ == "MaskAttn"  # readable in ComfyUI


def test_rows_gated_by_position_are_the_one_cond_row_rule(host):
    from comfyui_maskattn.masks.rows import cond_rows
    from comfyui_maskattn.nodes.gate_patch import PatchOrderError, chunk_rows

    for chunks, batch in (([1, 0], 4), ([0, 1], 2), (None, 3), ([1], 2), ([1, 0, 0], 6)):
        rows = chunk_rows({"cond_or_uncond": chunks}, batch, "cpu")
        assert rows.dtype == torch.bool and tuple(rows.tolist()) == cond_rows(chunks, batch)
    with pytest.raises(PatchOrderError, match=r"at input\.4\.0 runs 7 rows, "
                                              r"which do not split.*or turn gate_uncond on"):
        chunk_rows({"cond_or_uncond": [1, 0]}, 7, "cpu", ("input", 4, 0))


# --- attention backends that cannot take a mask ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sage", "flash"])
def test_backend_without_mask_support_warns_once_and_masked_layers_use_pytorch_attention(host, pack, sdxl, backend,
                                                                                         monkeypatch, caplog):
    import comfy.ldm.modules.attention as attention

    from comfyui_maskattn.masks import attention as maskattn_attention

    function = getattr(attention, f"attention_{backend}", None)
    if function is None:
        pytest.skip(f"this ComfyUI has no {backend} attention backend")
    unmasked_calls = []

    def sage_without_mask(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kwargs):
        """sageattention 2's signature restated: no attn_mask argument, extra keywords ignored."""
        unmasked_calls.append(tuple(q.shape))
        if tensor_layout == "NHD":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2) if tensor_layout == "NHD" else out

    def flash(q, k, v, dropout_p=0.0, causal=False):  # flash_attn_func's layout: [B, N, H, d]
        unmasked_calls.append(tuple(q.shape))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    if backend == "sage":
        monkeypatch.setattr(attention, "sageattn", sage_without_mask, raising=False)
    else:
        monkeypatch.setattr(attention, "flash_attn_wrapper", flash)
    pytorch, masked_calls = attention.attention_pytorch, []

    def pytorch_spy(q, k, v, heads, mask=None, *args, **kwargs):
        masked_calls.append(mask is not None)
        return pytorch(q, k, v, heads, mask, *args, **kwargs)

    monkeypatch.setattr(attention, "attention_pytorch", pytorch_spy)
    monkeypatch.setattr(attention, "optimized_attention", function)
    monkeypatch.setattr(attention, "optimized_attention_masked", function)
    monkeypatch.setattr(maskattn_attention, "_FALLBACKS_WARNED", set())
    pos, neg = conds(host, sdxl)
    with caplog.at_level(logging.WARNING):
        gated = host.ksample(apply(pack, sdxl, make_gates(sdxl)), pos, neg, steps=2)
    warnings = [r for r in caplog.records if r.name == "MaskAttn" and "cannot apply an attention mask" in r.message]
    assert len(warnings) == 1 and f"{backend} attention" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.name != "MaskAttn" and r.levelno >= logging.WARNING]  # no per-call
    assert unmasked_calls and masked_calls and all(masked_calls)  # masked layers: PyTorch attention, with the mask
    monkeypatch.setattr(attention, "optimized_attention", pytorch)
    monkeypatch.setattr(attention, "optimized_attention_masked", pytorch)
    torch.testing.assert_close(gated, host.ksample(apply(pack, sdxl, make_gates(sdxl)), pos, neg, steps=2))


# --- zero-shot gates (one prompt's token groups) under the couple ---------------------------------------------------
def test_zero_shot_gates_under_the_couple_gate_only_the_rows_of_their_own_prompt(host, pack, sdxl):
    from comfy.sdxl_clip import SDXLTokenizer
    from test_zeroshot_host import PROMPT, FakeClip

    from comfyui_maskattn.nodes.zeroshot import MaskAttnZeroShotGates

    gates = MaskAttnZeroShotGates().build(FakeClip(SDXLTokenizer()), PROMPT, "all", 0.0, "")["result"][0]
    assert gates.active
    pos, neg = conds(host, sdxl)
    couples = make_couple(host, sdxl), make_couple(host, sdxl)
    models = (apply(pack, with_couple(sdxl, couples[0]), gates), with_couple(apply(pack, sdxl, gates), couples[1]))
    spies = GateSpy(), GateSpy()
    latents = []
    for model, spy in zip(models, spies):
        runtime_of(model).observers.append(spy)
        latents.append(host.ksample(model, pos, neg, steps=2, batch=2))
    assert torch.equal(latents[0], latents[1])
    for runtime, couple, spy in zip(map(runtime_of, models), couples, spies):
        records = [r for r in couple.expanded if r[0] in runtime.sites]
        assert len(spy.calls) == len(records) > 0
        for (key, _, bias, _), (rkey, _, _, kinds) in zip(spy.calls, records):
            assert key == rkey
            gated = [bool((bias[r] != 0).any()) for r in range(len(kinds))]
            assert not any(g for g, kind in zip(gated, kinds) if kind != "base")  # uncond and region rows: P = 1
        assert any((bias[[r for r, kind in enumerate(kinds) if kind == "base"]] != 0).any()
                   for (_, _, bias, _), (_, _, _, kinds) in zip(spy.calls, records))


# --- region gates (one prompt's phrases kept in their masks) under the couple -----------------------------------------
def test_region_gates_under_the_couple_gate_only_their_prompts_rows_each_with_its_images_masks(host, pack, sdxl):
    """The couple turns the batch of 2 images into uncond 2 + base 2 + region 2 x 2 rows. The region gates find the
    base rows (by text, not by chunk position: by position the 8 rows would split into 4 'images' and the 2 masks per
    image would be refused) and gate each with its own image's masks; uncond and region rows stay untouched."""
    from comfy.sdxl_clip import SDXLTokenizer
    from test_region_gates import PROMPT, FakeClip, halves

    from comfyui_maskattn.nodes.region import MaskAttnRegionGates

    left, right = halves(64, 64)
    per_image = {"mask_1": torch.cat([left, right]), "mask_2": torch.cat([right, left])}  # image 1: swapped sides
    gates = MaskAttnRegionGates().build(FakeClip(SDXLTokenizer()), PROMPT, "red cube | blue sphere", "all", "keep",
                                        **per_image)["result"][0]
    pos, neg = conds(host, sdxl)
    plain = apply(pack, sdxl, gates)
    plain_spy = GateSpy()
    runtime_of(plain).observers.append(plain_spy)
    host.ksample(plain, pos, neg, steps=1, batch=2)
    expected = {}  # site -> [image 0's bias, image 1's bias] (it depends on the grid and the masks alone)
    for key, _, bias, chunks in plain_spy.calls:
        cond = chunks.index(0)
        expected[key] = [bias[cond * 2], bias[cond * 2 + 1]]
    assert all(not torch.equal(a, b) for a, b in expected.values())  # the two images' masks differ on every layer

    couples = make_couple(host, sdxl), make_couple(host, sdxl)
    models = (apply(pack, with_couple(sdxl, couples[0]), gates), with_couple(apply(pack, sdxl, gates), couples[1]))
    for model, couple in zip(models, couples):
        spy = GateSpy()
        runtime_of(model).observers.append(spy)
        host.ksample(model, pos, neg, steps=1, batch=2)
        records = [r for r in couple.expanded if r[0] in runtime_of(model).sites]
        assert len(spy.calls) == len(records) > 0
        for (key, _, bias, _), (rkey, _, _, kinds) in zip(spy.calls, records):
            assert key == rkey and len(kinds) == 8
            base = [r for r, kind in enumerate(kinds) if kind == "base"]
            for image, r in enumerate(base):  # (the couple repeats the 77 tokens to its common length: both copies)
                mine = expected[key][image]
                assert torch.equal(bias[r], mine.repeat(1, bias.shape[-1] // mine.shape[-1])), (key, image)
            assert not any((bias[r] != 0).any() for r, kind in enumerate(kinds) if kind != "base")
