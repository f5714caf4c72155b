"""Tiny random ComfyUI models, one importable place for the tools, the benchmarks and the tests.

The unet_config of an SDXL-architecture UNet of any size and the random weights such a UNet gets (nothing can be
downloaded where this pack is built), tiny SDXL / SD1.x ModelPatchers built from ComfyUI's own classes, random
conditioning for them, and ComfyUI's KSampler path to sample them. compbench's tiny text-to-image model and
train_step's models are built from `sdxl_unet_config` and `init_random_weights_`; the tests reach the rest through
tests/comfy_host.py. Importing this module never imports ComfyUI: the functions that need it load the host
(cli/host.py `load_host`, idempotent: a caller that wants the GPU or a backend loads it first).
"""

from __future__ import annotations

import torch

from . import host as _host

#: SDXL's `y` beside the pooled text: 6 size embeddings of Timestep(256) (see model_base.SDXL.encode_adm).
SDXL_SIZE_EMBED_DIM = 6 * 256


def sdxl_unet_config(model_channels: int, depths, context_dim: int, pooled_dim: int | None = None,
                     image_size: int = 32) -> dict:
    """ComfyUI's unet_config for an SDXL-architecture UNet with free sizes: SDXL's three levels (channel multipliers
    1/2/4, two res blocks each, `depths` transformer blocks per level; the middle block takes the last level's),
    linear projections, and the sequential `adm` of the pooled text (`pooled_dim`, default `context_dim`) and the
    size embeddings. SDXL itself is model_channels 320, depths (0, 2, 10), context 2048, pooled 1280."""
    depths = [int(d) for d in depths]
    return {
        "use_checkpoint": False,
        "image_size": image_size,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4],
        "transformer_depth": [d for d in depths for _ in range(2)],
        "transformer_depth_middle": depths[-1],
        "transformer_depth_output": [d for d in depths for _ in range(3)],
        "use_spatial_transformer": True,
        "legacy": False,
        "use_linear_in_transformer": True,
        "context_dim": context_dim,
        "adm_in_channels": (context_dim if pooled_dim is None else pooled_dim) + SDXL_SIZE_EMBED_DIM,
        "num_classes": "sequential",
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def init_random_weights_(unet, seed: int) -> None:
    """Deterministic random init of every parameter (ComfyUI's ops leave them uninitialised).

    Linear/conv weights ~ N(0, 1/fan_in) so activations keep their scale through the depth and attention is far
    from uniform; biases 0; norm weights 1, norm biases 0.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    done = set()
    with torch.no_grad():
        for module_name, module in unet.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                if isinstance(module, norm_types):
                    value = torch.ones(param.shape) if pname == "weight" else torch.zeros(param.shape)
                elif pname == "bias" or param.dim() < 2:
                    value = torch.zeros(param.shape)
                else:
                    value = torch.randn(param.shape, generator=gen) / param[0].numel() ** 0.5
                param.copy_(value.to(param.dtype))
                done.add(f"{module_name}.{pname}" if module_name else pname)
    missing = {n for n, _ in unet.named_parameters()} - done
    assert not missing, missing


def _patcher(model_config, base_cls, seed, device=None):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    model = base_cls(model_config, device=cpu)
    init_random_weights_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device or cpu), offload_device=cpu)


def tiny_sdxl(
    seed=0,
    transformer_depth=(0, 2, 2),
    context_dim=64,
    dtype=torch.float32,
    *,
    num_head_channels=16,
    manual_cast_dtype=None,
    model_channels=32,
    device=None,
):
    """A tiny random SDXL-architecture UNet (ComfyUI's own SDXL classes) in a CPU ModelPatcher.

    model_channels 32, channel_mult [1,2,4], num_res_blocks [2,2,2]: block numbers match real SDXL
    (attn at input 4,5,7,8 / middle 0 / output 0..5 with the default depths). ``transformer_depth``
    is per level, like SDXL's (0, 2, 10); the middle block takes the last level's depth.
    adm_in_channels = context_dim (pooled) + 1536 (size embeddings). Weights are ``dtype`` and the
    UNet computes in ``dtype`` (no manual cast) unless ``manual_cast_dtype`` is given.
    ``model_channels=320, transformer_depth=(0, 2, 10), context_dim=2048, num_head_channels=64`` is the real SDXL
    UNet's size (random weights, for benchmarks).
    """
    _host.load_host()
    import comfy.model_base
    import comfy.supported_models

    depths = [int(d) for d in transformer_depth]
    if len(depths) != 3 or depths[-1] <= 0:
        raise ValueError("transformer_depth: one depth per level, 3 levels, attention at the last")
    cfg = dict(sdxl_unet_config(model_channels, depths, context_dim), dtype=dtype)
    model_config = comfy.supported_models.SDXL(cfg)  # forces num_head_channels=64, num_heads=-1
    model_config.unet_config["num_head_channels"] = num_head_channels
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    return _patcher(model_config, comfy.model_base.SDXL, seed, device)


def tiny_sd15(seed=0, context_dim=64, dtype=torch.float32, *, num_heads=8, manual_cast_dtype=None):
    """A tiny random SD1.x-architecture UNet in a CPU ModelPatcher.

    model_channels 32, channel_mult [1,2,4,4], num_res_blocks 2, one transformer per attention
    block: attn at input 1,2,4,5,7,8 / middle 0 / output 3..11, like SD1.5. num_heads 8 like SD1.5.
    """
    _host.load_host()
    import comfy.model_base
    import comfy.supported_models

    cfg = {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_spatial_transformer": True,
        "legacy": False,
        "use_linear_in_transformer": False,
        "context_dim": context_dim,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "dtype": dtype,
    }
    model_config = comfy.supported_models.SD15(cfg)  # sets num_heads=8, num_head_channels=-1
    model_config.unet_config["num_heads"] = num_heads
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    return _patcher(model_config, comfy.model_base.BaseModel, seed)


def model_context_dim(model) -> int:
    return int(model.model.model_config.unet_config["context_dim"])


def is_sdxl(model) -> bool:
    import comfy.model_base

    return isinstance(model.model, comfy.model_base.SDXL)


def make_cond(model, tokens=77, seed=0, batch=1):
    """A CONDITIONING list ``[[context[batch, tokens, D], {...}]]`` with random content for ``model``.

    For SDXL the dict carries what CLIPTextEncodeSDXL gives (pooled_output and the size fields),
    so model_base.SDXL.encode_adm works; for SD1.x a pooled_output like CLIPTextEncode's.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    dim = model_context_dim(model)
    context = torch.randn((batch, tokens, dim), generator=gen)
    if is_sdxl(model):
        pooled_dim = int(model.model.model_config.unet_config["adm_in_channels"]) - SDXL_SIZE_EMBED_DIM
        extra = {
            "pooled_output": torch.randn((batch, pooled_dim), generator=gen),
            "width": 1024,
            "height": 1024,
            "crop_w": 0,
            "crop_h": 0,
            "target_width": 1024,
            "target_height": 1024,
        }
    else:
        extra = {"pooled_output": torch.randn((batch, dim), generator=gen)}
    return [[context, extra]]


def empty_latent(width=64, height=64, batch=1):
    """What EmptyLatentImage gives: ``{"samples": zeros[batch, 4, height // 8, width // 8]}``."""
    return {"samples": torch.zeros([batch, 4, height // 8, width // 8])}


def ksample(
    model,
    positive,
    negative,
    seed=0,
    steps=3,
    cfg=5.0,
    width=64,
    height=64,
    batch=1,
    sampler_name="euler",
    scheduler="normal",
    denoise=1.0,
):
    """Run ComfyUI's KSampler node path (``nodes.common_ksampler``) from an empty latent.

    Returns the output latent ``samples`` tensor ``[batch, 4, height // 8, width // 8]``.
    """
    _host.load_host()
    import nodes

    with torch.inference_mode():
        (out,) = nodes.common_ksampler(
            model,
            seed,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            empty_latent(width, height, batch),
            denoise=denoise,
        )
    return out["samples"]


def attn2_keys(model):
    """(block_name, number, index) of every cross-attention transformer block in ``model``'s UNet."""
    unet = model.model.diffusion_model
    keys = []
    for block_name, blocks in (
        ("input", unet.input_blocks),
        ("middle", [unet.middle_block]),
        ("output", unet.output_blocks),
    ):
        for number, block in enumerate(blocks):
            for layer in block:
                for index, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                    if hasattr(tb, "attn2"):
                        keys.append((block_name, number, index))
    return keys
