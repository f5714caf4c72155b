"""A tiny random SDXL-topology UNet built from ComfyUI's own classes, a stand-in CLIP and VAE (test-only)."""

from __future__ import annotations

import torch

CONTEXT_DIM = 64
SIZE_EMBED_DIM = 6 * 256  # SDXL's y: pooled text + 6 size embeddings
TINY_GATES = "maskattn_tiny_test.safetensors"


def _init_(module: torch.nn.Module, seed: int):
    """ComfyUI's ops leave weights uninitialised: fill them deterministically (N(0, 1/fan_in), norms 1, biases 0)."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" or p.dim() < 2:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)


def tiny_sdxl_model(seed: int = 0):
    """ModelPatcher of an SDXL-architecture UNet: model_channels 32, depths (0, 2, 2), context 64, on the CPU."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 2, 2],
        "transformer_depth_middle": 2, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2],
        "use_spatial_transformer": True, "legacy": False, "use_linear_in_transformer": True,
        "context_dim": CONTEXT_DIM, "adm_in_channels": CONTEXT_DIM + SIZE_EMBED_DIM, "num_classes": "sequential",
        "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": torch.float32,
    }
    config = comfy.supported_models.SDXL(cfg)
    config.unet_config["num_head_channels"] = 16
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model = comfy.model_base.SDXL(config, device=cpu)
    _init_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class TinyCLIP:
    """Duck-typed CLIP: ComfyUI's real CLIP-L tokenizer (so words and token positions are real) and a random
    embedding table instead of a text transformer."""

    def __init__(self, seed: int = 0):
        import comfy.sd1_clip

        self.tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=None)
        gen = torch.Generator().manual_seed(int(seed) + 1)
        self.table = torch.randn(49408, CONTEXT_DIM, generator=gen)
        self.position = torch.randn(77, CONTEXT_DIM, generator=gen) * 0.5

    def clone(self):
        return self

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids)

    def _encode(self, tokens):
        chunks = []
        for chunk in tokens["l"]:
            ids = torch.tensor([int(t[0]) if isinstance(t[0], int) else 0 for t in chunk])
            weights = torch.tensor([float(t[1]) for t in chunk])[:, None]
            chunks.append(self.table[ids] * weights + self.position[: len(ids)])
        cond = torch.cat(chunks)[None]
        return cond, cond[:, 0]

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond, pooled = self._encode(tokens)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        cond, pooled = self._encode(tokens)
        return [[cond, {"pooled_output": pooled, **(add_dict or {})}]]

    def encode(self, text):
        return self.encode_from_tokens(self.tokenize(text))


class TinyVAE:
    """Duck-typed VAE: latent [B, 4, h, w] -> image [B, 8h, 8w, 3] by a fixed colour map and upsampling."""

    mix = torch.tensor([[0.6, 0.2, -0.3], [-0.2, 0.5, 0.3], [0.3, -0.4, 0.6], [0.1, 0.2, 0.1]])

    def decode(self, samples):
        rgb = torch.einsum("bchw,cd->bdhw", samples.float(), self.mix)
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="bilinear", align_corners=False)
        grey = rgb.mean(1, keepdim=True)  # muted colours, so heatmaps drawn over it stay readable
        return (0.3 + 0.4 * torch.sigmoid(grey + 0.3 * rgb)).permute(0, 2, 3, 1).contiguous()

    def encode(self, pixels):
        b, h, w, _ = pixels.shape
        return torch.zeros(b, 4, h // 8, w // 8)

    def spacial_compression_decode(self):
        return 8

    def spacial_compression_encode(self):
        return 8


class MaskAttnTestTinyCheckpoint:
    """Stands in for 'Load Checkpoint' in tests: same outputs, a tiny random model."""

    DESCRIPTION = "TEST ONLY: a tiny random SDXL-architecture model (noise images). For tests and smoke runs."
    CATEGORY = "MaskAttn/testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def load(self, seed):
        return shrink_large_latents(tiny_sdxl_model(seed)), TinyCLIP(seed), TinyVAE()


INNER_SIDE = 32  # latent cells a side the tiny UNet's first level works at, whatever the image size


def shrink_large_latents(model):
    """A clone that runs the UNet's inner blocks at most INNER_SIDE cells a side (ComfyUI's own block patches, as
    its PatchModelAddDownscale node uses them): the shipped workflows' 1024x1024 then take seconds on a CPU. Latents
    of INNER_SIDE or less pass untouched."""
    import torch.nn.functional as F

    def after_skip(h, transformer_options):
        if transformer_options["block"][1] == 0 and max(h.shape[-2:]) > INNER_SIDE:
            factor = max(h.shape[-2:]) / INNER_SIDE
            h = F.interpolate(h, size=(max(1, round(h.shape[-2] / factor)), max(1, round(h.shape[-1] / factor))),
                              mode="bilinear", align_corners=False)
        return h

    def output(h, hsp, transformer_options):
        if h.shape[-2:] != hsp.shape[-2:]:
            h = F.interpolate(h, size=hsp.shape[-2:], mode="bilinear", align_corners=False)
        return h, hsp

    shrunk = model.clone()
    shrunk.set_model_input_block_patch_after_skip(after_skip)
    shrunk.set_model_output_block_patch(output)
    return shrunk


def write_tiny_gates(folder, seed: int = 0, name: str = TINY_GATES):
    """Random gate heads for every site of the tiny model, saved as a MaskAttn gate file (needs the pack importable
    as `comfyui_maskattn` and ComfyUI loaded in this process)."""
    from pathlib import Path

    from comfyui_maskattn.masks.gatefile import save_gates
    from comfyui_maskattn.masks.gates import MaskAttnGates
    from comfyui_maskattn.masks.topology import discover_sites

    sites = discover_sites(tiny_sdxl_model(seed).model.diffusion_model)
    gates = MaskAttnGates.fresh(sites, hidden_dim=16, seed=seed, stage="all", kind="test_only")
    gen = torch.Generator().manual_seed(int(seed) + 7)
    with torch.no_grad():
        for p in gates.heads.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_gates(gates, path)
    return path


NODE_CLASS_MAPPINGS = {"MaskAttnTestTinyCheckpoint": MaskAttnTestTinyCheckpoint}
NODE_DISPLAY_NAME_MAPPINGS = {"MaskAttnTestTinyCheckpoint": "MaskAttn Test: Tiny Random Checkpoint"}
