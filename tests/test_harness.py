"""The harness itself: host loading, tiny models, conditioning and sampling through ComfyUI."""

import sys

import comfy_host
import pytest
import torch

SDXL_ATTN_BLOCKS = [("input", n) for n in (4, 5, 7, 8)] + [("middle", 0)] + [("output", n) for n in range(6)]
SD15_ATTN_BLOCKS = [("input", n) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", n) for n in range(3, 12)]


def _keys(blocks, depth_of):
    return [(name, n, i) for name, n in blocks for i in range(depth_of(name, n))]


def _sdxl_depth(level_depths):
    d0, d1, d2 = level_depths  # level 0 has no attention blocks in SDXL's numbering checked here
    assert d0 == 0

    def depth_of(name, n):
        if name == "input":
            return d1 if n in (4, 5) else d2
        if name == "middle":
            return d2
        return d2 if n < 3 else d1

    return depth_of


def _first_attn2(model):
    for module in model.model.diffusion_model.modules():
        if hasattr(module, "attn2"):
            return module.attn2
    raise AssertionError("no attn2")


def _unet_forward(model, cond, sigma=1.0, seed=0):
    """One apply_model call (the host's own input/dtype handling), fp32 output."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=gen)
    ctx, extra = cond[0]
    kwargs = {}
    if comfy_host.is_sdxl(model):
        kwargs["y"] = model.model.encode_adm(**extra)
    with torch.inference_mode():
        return model.model.apply_model(x, torch.tensor([sigma]), c_crossattn=ctx, **kwargs).float()


# --------------------------------------------------------------------------------------------------


def test_host_is_loaded_on_cpu(host):
    import comfy.model_management

    import nodes

    assert str(nodes.__file__).startswith(str(host.HOST_PATH))
    assert comfy.model_management.get_torch_device().type == "cpu"
    assert comfy.model_management.cpu_state == comfy.model_management.CPUState.CPU


def test_attention_backend_follows_env(host):
    expected = {
        "": None,
        "pytorch": "attention_pytorch",
        "split": "attention_split",
        "sub_quad": "attention_sub_quad",
        "basic": "attention_basic",
    }[host.attention_backend()]
    name = host.attention_function_name()
    assert name.startswith("attention_")
    if expected is not None:
        assert name == expected


def test_pack_registered_without_running_init():
    pack = sys.modules[comfy_host.PACK_NAME]
    assert list(pack.__path__) == [str(comfy_host.REPO_ROOT)]
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # the root __init__.py was not executed
    assert comfy_host.register_pack() is pack


def test_sdxl_attn2_keys(host):
    model = host.tiny_sdxl()
    assert host.attn2_keys(model) == _keys(SDXL_ATTN_BLOCKS, _sdxl_depth((0, 2, 2)))
    blocks = sorted({(name, n) for name, n, _ in host.attn2_keys(model)})
    assert blocks == sorted(SDXL_ATTN_BLOCKS)


def test_sdxl_real_depths_attn2_keys(host):
    model = host.tiny_sdxl(transformer_depth=(0, 2, 10))
    keys = host.attn2_keys(model)
    assert keys == _keys(SDXL_ATTN_BLOCKS, _sdxl_depth((0, 2, 10)))
    assert sum(1 for k in keys if k[:2] == ("middle", 0)) == 10
    assert len(keys) == 70  # real SDXL: 70 cross-attention layers


def test_sd15_attn2_keys(host):
    model = host.tiny_sd15()
    assert host.attn2_keys(model) == [(name, n, 0) for name, n in SD15_ATTN_BLOCKS]


def test_tiny_config(host):
    sdxl, sd15 = host.tiny_sdxl(context_dim=48), host.tiny_sd15(context_dim=40)
    assert host.is_sdxl(sdxl) and not host.is_sdxl(sd15)
    assert host.model_context_dim(sdxl) == 48 and host.model_context_dim(sd15) == 40
    assert _first_attn2(sdxl).to_k.in_features == 48
    assert _first_attn2(sd15).to_k.in_features == 40
    assert sdxl.load_device.type == "cpu" and sdxl.offload_device.type == "cpu"
    heads = {m.attn2.heads for m in sdxl.model.diffusion_model.modules() if hasattr(m, "attn2")}
    assert heads == {4, 8}  # 64 and 128 channels at 16 per head
    heads = {m.attn2.heads for m in sd15.model.diffusion_model.modules() if hasattr(m, "attn2")}
    assert heads == {8}


def test_weights_deterministic_by_seed(host):
    a, b, c = host.tiny_sdxl(seed=3), host.tiny_sdxl(seed=3), host.tiny_sdxl(seed=4)
    sa, sb, sc = (m.model.diffusion_model.state_dict() for m in (a, b, c))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].dim() >= 2)
    for k, v in sa.items():
        assert torch.isfinite(v).all(), k
    assert sa["out.2.weight"].abs().sum() > 0  # the output conv is not zero


def test_make_cond(host):
    sdxl = host.tiny_sdxl()
    cond = host.make_cond(sdxl, tokens=154, seed=5, batch=2)
    assert len(cond) == 1
    ctx, extra = cond[0]
    assert ctx.shape == (2, 154, 64)
    assert extra["pooled_output"].shape == (2, 64)
    adm = sdxl.model.encode_adm(**extra)
    assert adm.shape == (2, sdxl.model.model_config.unet_config["adm_in_channels"])
    again = host.make_cond(sdxl, tokens=154, seed=5, batch=2)
    assert torch.equal(again[0][0], ctx)
    assert not torch.equal(host.make_cond(sdxl, tokens=154, seed=6, batch=2)[0][0], ctx)
    sd15 = host.tiny_sd15(context_dim=32)
    assert host.make_cond(sd15, tokens=77)[0][0].shape == (1, 77, 32)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_ksample_deterministic_finite(host, arch):
    model = host.tiny_sdxl() if arch == "sdxl" else host.tiny_sd15()
    pos, neg = host.make_cond(model, seed=1), host.make_cond(model, seed=2)
    out = host.ksample(model, pos, neg, seed=0, steps=3)
    assert out.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3
    assert torch.equal(out, host.ksample(model, pos, neg, seed=0, steps=3))
    assert torch.equal(out, host.ksample(host.tiny_sdxl() if arch == "sdxl" else host.tiny_sd15(), pos, neg))
    other_seed = host.ksample(model, pos, neg, seed=1, steps=3)
    other_cond = host.ksample(model, host.make_cond(model, seed=3), neg, seed=0, steps=3)
    assert (other_seed - out).abs().max() > 1e-3
    assert (other_cond - out).norm() > 0.05 * out.norm()  # the text context matters


def test_ksample_shapes_and_options(host):
    model = host.tiny_sdxl(context_dim=32)
    pos, neg = host.make_cond(model, tokens=154, seed=1), host.make_cond(model, tokens=77, seed=2)
    out = host.ksample(
        model, pos, neg, width=96, height=64, batch=2, steps=2, cfg=3.0, sampler_name="dpmpp_2m", scheduler="karras"
    )
    assert out.shape == (2, 4, 8, 12)
    assert torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().max() > 1e-3  # per-latent noise differs
    cfg1 = host.ksample(model, pos, neg, steps=2, cfg=1.0, denoise=0.5)
    assert torch.isfinite(cfg1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_low_precision_models(host, arch, dtype):
    build = host.tiny_sdxl if arch == "sdxl" else host.tiny_sd15
    model, ref = build(dtype=dtype), build()
    assert {p.dtype for p in model.model.diffusion_model.parameters()} == {dtype}
    seen = []
    hook = _first_attn2(model).to_q.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        pos, neg = host.make_cond(model, seed=1), host.make_cond(model, seed=2)
        out = host.ksample(model, pos, neg, steps=3)
    finally:
        hook.remove()
    assert seen and set(seen) == {dtype}  # attention really runs in the low precision
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3
    # the same weights, rounded: one UNet call stays close to the fp32 model's
    low, full = _unet_forward(model, pos), _unet_forward(ref, pos)
    assert torch.isfinite(low).all()
    rel = ((low - full).norm() / full.norm()).item()
    assert rel < (0.02 if dtype == torch.float16 else 0.1), rel
