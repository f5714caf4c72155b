"""A tiny text-to-image model of the CompBench world, in SDXL's architecture, built from ComfyUI's own classes.

- UNet: ComfyUI's `comfy.model_base.SDXL` (`openaimodel.UNetModel`) with SDXL's topology: 3 levels, channel_mult
  [1, 2, 4], 2 res blocks per level, no attention at level 1, linear-in spatial transformers at levels 2 and 3 and
  the middle block, `adm` conditioning = [pooled text, 6 size embeddings]; only the widths and depths are tiny.
  The pack sees it as SDXL (its cross-attention sites are SDXL's input 4/5/7/8, middle 0, output 0-5 blocks).
- Text encoder: `TinyTextEncoder`, a 2-layer causal transformer over the worlds' 21-word vocabulary (CLIP-style:
  start token, words, end token, padded with the end token; pooled = the end token's state, projected). A model
  file stores its vocabulary; a file trained on a prefix of it (the first model knew 20 words, no "and") loads with
  that prefix.
- "VAE": pixel space. A 32x32 RGB image in [-1, 1] is the latent's first 3 channels; the 4th (SDXL latents have
  4) is always 0 and ignored when decoding. `PixelLatent` tells ComfyUI so (scale factor 1).
- Noise schedule and parameterisation: SDXL's (discrete scaled-linear betas, epsilon prediction), so ComfyUI's
  samplers and the pack's trainer treat it exactly like SDXL.

`TinyClip` gives the text encoder the parts of ComfyUI's CLIP object that the pack's nodes use (`tokenize` with
word ids, the tokenizer's `inv_vocab`), so "MaskAttn Zero-Shot Gates" runs on it unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import world

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# new words go at the end: a model trained on a prefix of the vocabulary keeps its token ids
WORDS = ["a", "an", *world.COLOURS, *world.SHAPES, "to", "the", "left", "right", "of", "above", "below", "and"]
VOCAB = [SOT, EOT, *WORDS]
TOKEN_IDS = {w: i for i, w in enumerate(VOCAB)}
FORMAT = "maskattn-compbench-tiny-t2i"


@dataclass
class TinyConfig:
    image_size: int = 32
    tokens: int = 16  # context length (CLIP: 77); captions are at most 12 tokens with start and end
    text_dim: int = 64  # = the UNet's context_dim and the pooled size
    text_layers: int = 2
    text_heads: int = 4
    model_channels: int = 16
    transformer_depth: tuple = (0, 1, 1)  # per level, like SDXL's (0, 2, 10)
    num_head_channels: int = 16
    norm_channels_per_group: int = 8  # GroupNorm groups: see norm_groups

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TinyConfig":
        d = json.loads(text)
        d["transformer_depth"] = tuple(d["transformer_depth"])
        return cls(**d)


# --- text ---------------------------------------------------------------------------------------------------------
def known_words(text: str, vocab_size: int = len(VOCAB)) -> list[str]:
    """The caption's words the model has tokens for (a phrasing it never saw reads as no relation at all)."""
    return [w for w in text.lower().split() if TOKEN_IDS.get(w, vocab_size) < vocab_size and w not in (SOT, EOT)]


def token_ids(text: str, length: int, vocab_size: int = len(VOCAB), drop_unknown: bool = False) -> list[int]:
    words = known_words(text, vocab_size) if drop_unknown else text.lower().split()
    unknown = [w for w in words if TOKEN_IDS.get(w, vocab_size) >= vocab_size or w in (SOT, EOT)]
    if unknown:
        known = " ".join(w for w in WORDS if TOKEN_IDS[w] < vocab_size)
        raise ValueError(f"words outside this model's CompBench vocabulary: {unknown}; known: {known}")
    ids = [TOKEN_IDS[SOT], *(TOKEN_IDS[w] for w in words), TOKEN_IDS[EOT]]
    if len(ids) > length:
        raise ValueError(f"caption of {len(words)} words is longer than the {length - 2} the encoder takes")
    return ids + [TOKEN_IDS[EOT]] * (length - len(ids))


class TinyTextEncoder(nn.Module):
    """Causal transformer text encoder (CLIP's shape in miniature): states [B, T, D] and pooled [B, D]."""

    def __init__(self, cfg: TinyConfig, vocab_size: int = len(VOCAB)):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.drop_unknown = False  # the phrasings world: words outside the vocabulary are left out, not refused
        d = cfg.text_dim
        self.embed = nn.Embedding(vocab_size, d)
        self.position = nn.Parameter(torch.randn(cfg.tokens, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.text_heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.pool = nn.Linear(d, d)
        self.register_buffer("causal", torch.triu(torch.full((cfg.tokens, cfg.tokens), float("-inf")), 1),
                             persistent=False)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        x = self.norm(self.layers(x, mask=self.causal[: ids.shape[1], : ids.shape[1]], is_causal=True))
        first_end = (ids == TOKEN_IDS[EOT]).int().argmax(dim=1)  # CLIP pools at the (first) end token
        pooled = self.pool(x[torch.arange(ids.shape[0]), first_end])
        return x, pooled

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = torch.tensor([token_ids(t, self.cfg.tokens, self.vocab_size, self.drop_unknown) for t in texts],
                           device=self.position.device)
        return self(ids)


class _TinyTokenizer:
    """What the pack reads of a ComfyUI tokenizer: `clip_l.inv_vocab` (id -> BPE piece; words end in </w>)."""

    def __init__(self, vocab_size: int = len(VOCAB)):
        inv = {i: (w if w in (SOT, EOT) else w + "</w>") for i, w in enumerate(VOCAB[:vocab_size])}
        self.clip_l = self.clip_g = type("TinySubTokenizer", (), {"inv_vocab": inv})()


class TinyClip:
    """The tiny text encoder behind the part of ComfyUI's CLIP interface the pack uses.

    tokenize(text) -> {"g": chunks, "l": chunks} like SDXL's CLIP (one chunk of (token, weight, word_id)), and
    `conditioning(texts)` -> ComfyUI CONDITIONING ([[states [B, T, D], {"pooled_output": [B, D]}]]).
    """

    def __init__(self, encoder: TinyTextEncoder):
        self.encoder = encoder
        self.tokenizer = _TinyTokenizer(encoder.vocab_size)

    def tokenize(self, text: str, return_word_ids: bool = False):
        ids = token_ids(text, self.encoder.cfg.tokens, self.encoder.vocab_size, self.encoder.drop_unknown)
        n_words = len(known_words(text, self.encoder.vocab_size) if self.encoder.drop_unknown else text.split())
        chunk = []
        for position, token in enumerate(ids):
            word_id = position if 1 <= position <= n_words else 0
            chunk.append((token, 1.0, word_id) if return_word_ids else (token, 1.0))
        return {"g": [chunk], "l": [list(chunk)]}

    @torch.no_grad()
    def encode_from_tokens(self, tokens: dict, return_pooled=False, return_dict=False):
        """ComfyUI's CLIP.encode_from_tokens on what `tokenize` returned (so CLIP Text Encode runs on it)."""
        ids = torch.tensor([[int(item[0]) for item in tokens["l"][0]]], device=self.encoder.position.device)
        states, pooled = self.encoder(ids)
        states, pooled = states.float(), pooled.float()
        if return_dict:
            return {"cond": states, "pooled_output": pooled}
        return (states, pooled) if return_pooled else states

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected=False, add_dict=None, show_pbar=True):
        out = self.encode_from_tokens(tokens, return_dict=True)
        cond = out.pop("cond")
        return [[cond, {**out, **(add_dict or {})}]]

    @torch.no_grad()
    def conditioning(self, texts: list[str]) -> list:
        states, pooled = self.encoder.encode(list(texts))
        return [[states.float(), {"pooled_output": pooled.float()}]]


# --- pixels <-> latent ----------------------------------------------------------------------------------------------
def encode_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 [B, H, W, 3] -> latent [B, 4, H, W]: RGB in [-1, 1] and a zero 4th channel."""
    x = torch.as_tensor(np.asarray(images)).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)
    return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1).contiguous()


def decode_latents(latent: Tensor) -> np.ndarray:
    """latent [B, 4, H, W] -> uint8 [B, H, W, 3]."""
    x = latent[:, :3].float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def latent_format():
    """A ComfyUI LatentFormat for pixel latents (scale 1, 4 channels, previews straight from RGB)."""
    import comfy.latent_formats

    class PixelLatent(comfy.latent_formats.LatentFormat):
        scale_factor = 1.0
        latent_channels = 4
        latent_rgb_factors = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
        taesd_decoder_name = None

    return PixelLatent()


# --- the host -------------------------------------------------------------------------------------------------------
def load_host():
    """Import ComfyUI (found as cli/host.py finds it) on the CPU with PyTorch's attention, and register this pack.
    Idempotent; everything below that builds or loads a model needs it."""
    from cli import host

    host.load_host(host.find_host(), cpu=True, attention="pytorch")


# --- the UNet -------------------------------------------------------------------------------------------------------
def unet_config(cfg: TinyConfig) -> dict:
    from cli.tiny_models import sdxl_unet_config

    return sdxl_unet_config(cfg.model_channels, cfg.transformer_depth, cfg.text_dim, image_size=cfg.image_size)


def norm_groups(num_groups: int, channels: int, per_group: int = 8) -> int:
    """GroupNorm groups for a narrow layer: at most SDXL's `num_groups`, at least `per_group` channels per group.

    Why not 32 groups of 1 channel: a one-channel group is InstanceNorm, which erases each channel's spatial mean,
    so the network cannot see or predict a picture's overall colour (a first model trained that way drew
    coloured, noisy backgrounds on this grey world). SDXL itself has 10 channels per group at 320 channels.
    """
    groups = max(1, min(int(num_groups), int(channels) // per_group))
    while channels % groups:
        groups -= 1
    return groups


def tiny_operations(per_group: int = 8):
    """ComfyUI's own layer classes (comfy.ops.disable_weight_init), except that GroupNorm takes `norm_groups`
    groups: SDXL's 32 groups assume >= 32 channels (10 per group at 320), and widths of 16 are what make training
    on a 2-core CPU fit well inside an hour."""
    import comfy.ops

    class TinyOps(comfy.ops.disable_weight_init):
        class GroupNorm(comfy.ops.disable_weight_init.GroupNorm):
            def __init__(self, num_groups, num_channels, *args, **kwargs):
                super().__init__(norm_groups(num_groups, num_channels, per_group), num_channels, *args, **kwargs)

    return TinyOps


def build_base_model(cfg: TinyConfig, dtype=torch.float32):
    """comfy.model_base.SDXL with the tiny config and pixel latents (weights uninitialised: ComfyUI's ops)."""
    import comfy.model_base
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ucfg = unet_config(cfg)
    model_config = comfy.supported_models.SDXL(ucfg)
    model_config.unet_config["num_head_channels"] = cfg.num_head_channels
    model_config.latent_format = latent_format()
    model_config.set_inference_dtype(dtype, None)
    model_config.unet_config["disable_unet_model_creation"] = True
    base = comfy.model_base.SDXL(model_config, device=torch.device("cpu"))
    unet_kwargs = {k: v for k, v in model_config.unet_config.items() if k != "disable_unet_model_creation"}
    ops = tiny_operations(cfg.norm_channels_per_group)
    base.diffusion_model = UNetModel(**unet_kwargs, device=torch.device("cpu"), operations=ops)
    model_config.unet_config.pop("disable_unet_model_creation")
    return base


def init_unet_(unet: nn.Module, seed: int) -> None:
    """Fresh weights for training from scratch (ComfyUI's ops skip init): PyTorch's defaults, zeroed output convs."""
    torch.manual_seed(seed)
    for m in unet.modules():
        _reset(m)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        final = unet.out[-1]
        final.weight.zero_()
        final.bias.zero_()


def _reset(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Conv3d)):
        nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
        if m.bias is not None:
            fan_in = m.weight[0].numel()
            nn.init.uniform_(m.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


def size_conditions(model, pooled: Tensor, image_size: int) -> Tensor:
    """SDXL's `y` for this pooled text exactly as ComfyUI's samplers make it: encode_adm with width/height = the
    latent's size x 8 (what `encode_model_conds` passes), crop 0, target = width/height."""
    side = int(image_size) * 8
    return model.encode_adm(pooled_output=pooled, width=side, height=side, target_width=side, target_height=side)


# --- the file -------------------------------------------------------------------------------------------------------
def save(path: str | Path, cfg: TinyConfig, unet: nn.Module, text: TinyTextEncoder, extra: dict | None = None,
         dtype=torch.float16) -> None:
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v.detach().to(dtype).contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().to(dtype).contiguous() for k, v in text.state_dict().items()})
    meta = {"format": FORMAT, "config": cfg.to_json(), "vocab": json.dumps(VOCAB[: text.vocab_size])}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    save_file(tensors, str(path), metadata=meta)


def load(path: str | Path, dtype=torch.float32):
    """-> (ModelPatcher on the CPU, TinyClip, TinyConfig, metadata). Needs the ComfyUI host loaded."""
    import comfy.model_patcher
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
        vocab = json.loads(meta["vocab"])
        if vocab != VOCAB[: len(vocab)]:
            raise ValueError(f"{path}: trained with another vocabulary than benchmarks/compbench/tinyt2i.py's")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = TinyConfig.from_json(meta["config"])
    base = build_base_model(cfg, dtype)
    unet_sd = {k[5:]: v.to(dtype) for k, v in tensors.items() if k.startswith("unet.")}
    base.diffusion_model.load_state_dict(unet_sd, strict=True)
    base.eval()
    text = TinyTextEncoder(cfg, len(vocab))
    text.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("text.")}, strict=True)
    text.eval()
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    return patcher, TinyClip(text), cfg, meta
