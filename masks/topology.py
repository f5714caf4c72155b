"""Where the cross-attention layers of an SDXL / SD1.x UNet sit, in ComfyUI's terms and in diffusers' terms.

ComfyUI addresses a cross-attention layer by its replace-patch key (block, number, index): block is "input",
"middle" or "output", number the position in that block list, index the transformer block inside that
SpatialTransformer. The reference implementation (diffusers) names the same layer
`down_blocks.{level}.attentions.{j}.transformer_blocks.{index}.attn2`. Sites are discovered from the model by
duck typing (ComfyUI's `UNetModel` attribute names), so finetunes, SD1.x and odd depths work without a table.

Stages (method spec): "mid" = the deepest resolution level that has cross-attention in the encoder/decoder
(SDXL: input 7, 8 / output 0-2), "high" = every shallower level (SDXL: input 4, 5 / output 3-5), "low" = the
middle block. For SD1.x that makes input 7, 8 / output 3-5 "mid", and levels 0 and 1 "high".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

SiteKey = tuple[str, int, int]

STAGES = ("high", "mid", "low")
STAGE_CHOICES = ("mid", "high", "low", "all")
PLACEMENTS = ("encoder_decoder", "encoder", "decoder")
PLACEMENT_OF_BLOCK = {"input": "encoder", "middle": "bridge", "output": "decoder"}


class UnsupportedModelError(ValueError):
    """The model has no UNet cross-attention MaskAttn knows how to gate."""


@dataclass(frozen=True)
class CrossAttnSite:
    block: str  # "input" | "middle" | "output"
    number: int  # index in input_blocks / output_blocks (0 for middle)
    index: int  # transformer block inside that SpatialTransformer
    feature_dim: int  # C: width of the latent features entering to_q
    context_dim: int  # D: width of the text states entering to_k
    heads: int
    level: int  # resolution level, 0 = full latent resolution
    attention_number: int  # j: which SpatialTransformer of its level (diffusers `attentions.j`)
    up_block: int  # diffusers up_blocks index for decoder sites (deepest = 0), else -1
    stage: str  # "high" | "mid" | "low"

    @property
    def key(self) -> SiteKey:
        return (self.block, self.number, self.index)

    @property
    def placement(self) -> str:
        return PLACEMENT_OF_BLOCK[self.block]

    @property
    def name(self) -> str:
        """Short stable label, also the key used in gate files: "input.7.3"."""
        return key_to_name(self.key)

    @property
    def diffusers_name(self) -> str:
        if self.block == "input":
            prefix = f"down_blocks.{self.level}.attentions.{self.attention_number}"
        elif self.block == "output":
            prefix = f"up_blocks.{self.up_block}.attentions.{self.attention_number}"
        else:
            prefix = "mid_block.attentions.0"
        return f"{prefix}.transformer_blocks.{self.index}.attn2"


def key_to_name(key: SiteKey) -> str:
    return f"{key[0]}.{key[1]}.{key[2]}"


def name_to_key(name: str) -> SiteKey:
    m = re.fullmatch(r"(input|middle|output)\.(\d+)\.(\d+)", name)
    if not m:
        raise ValueError(f"not a cross-attention site name: {name!r} (expected e.g. 'input.7.3')")
    return (m.group(1), int(m.group(2)), int(m.group(3)))


_DIFFUSERS_RE = re.compile(
    r"(?:(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.0)\.transformer_blocks\.(\d+)\.attn2"
)


def diffusers_name_to_key(name: str, res_blocks: int = 2) -> SiteKey:
    """`down_blocks.2.attentions.0.transformer_blocks.3.attn2` -> ("input", 7, 3).

    Uses ComfyUI's block numbering for a UNet with `res_blocks` resnets per level (2 for SDXL and SD1.x):
    input blocks count conv_in, then res_blocks blocks plus one downsample per level; output blocks count
    res_blocks + 1 per level, deepest first.
    """
    m = _DIFFUSERS_RE.fullmatch(name.removesuffix(".processor"))
    if not m:
        raise ValueError(f"not a diffusers cross-attention name: {name!r}")
    kind, level, j, index = m.group(1), m.group(2), m.group(3), int(m.group(4))
    if kind is None:
        return ("middle", 0, index)
    level, j = int(level), int(j)
    if kind == "down_blocks":
        return ("input", 1 + level * (res_blocks + 1) + j, index)
    return ("output", level * (res_blocks + 1) + j, index)


def _transformer_blocks(block: nn.Module):
    """(SpatialTransformer-like module) children of one UNet block, in order."""
    for child in block.children():
        if hasattr(child, "transformer_blocks"):
            yield child


def _has(block: nn.Module, class_name: str) -> bool:
    return any(type(child).__name__ == class_name for child in block.children())


def discover_sites(diffusion_model: nn.Module) -> list[CrossAttnSite]:
    """Every cross-attention layer of a ComfyUI UNetModel, in execution order."""
    if not all(hasattr(diffusion_model, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModelError(
            f"MaskAttn gates the cross-attention of UNet models (SDXL, SD1.x); this model's diffusion model is "
            f"{type(diffusion_model).__name__}, which has no input/middle/output blocks (DiT models such as Flux or "
            f"SD3 are not supported)."
        )
    raw: list[dict] = []

    def collect(block_name, number, block, level, attention_number, up_block):
        for st in _transformer_blocks(block):
            for index, tb in enumerate(st.transformer_blocks):
                attn2 = getattr(tb, "attn2", None)
                if attn2 is None or not hasattr(attn2, "to_k"):
                    continue
                raw.append(dict(
                    block=block_name, number=number, index=index, feature_dim=int(attn2.to_q.in_features),
                    context_dim=int(attn2.to_k.in_features), heads=int(attn2.heads), level=level,
                    attention_number=attention_number, up_block=up_block,
                ))

    level, j = 0, 0
    for number, block in enumerate(diffusion_model.input_blocks):
        if number == 0:
            continue  # conv_in
        if _has(block, "Downsample"):
            level, j = level + 1, 0
            continue
        collect("input", number, block, level, j, -1)
        j += 1
    deepest = level
    collect("middle", 0, diffusion_model.middle_block, deepest, 0, -1)
    up, j = 0, 0
    for number, block in enumerate(diffusion_model.output_blocks):
        collect("output", number, block, deepest - up, j, up)
        j += 1
        if _has(block, "Upsample"):
            up, j = up + 1, 0

    if not raw:
        raise UnsupportedModelError(
            "MaskAttn found no cross-attention layers in this UNet (is it a text-to-image model?)")
    mid_level = max((r["level"] for r in raw if r["block"] != "middle"), default=deepest)
    sites = []
    for r in raw:
        stage = "low" if r["block"] == "middle" else ("mid" if r["level"] == mid_level else "high")
        sites.append(CrossAttnSite(stage=stage, **r))
    return sites


def select_sites(sites: list[CrossAttnSite], stage: str = "mid",
                 placement: str = "encoder_decoder") -> list[CrossAttnSite]:
    """The reference's stage/placement filter: "encoder_decoder" also takes the middle block when its stage is in."""
    if stage not in STAGE_CHOICES:
        raise ValueError(f"stage must be one of {STAGE_CHOICES}, got {stage!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    allowed = {"encoder": {"encoder"}, "decoder": {"decoder"},
               "encoder_decoder": {"encoder", "decoder", "bridge"}}[placement]
    return [s for s in sites if (stage == "all" or s.stage == stage) and s.placement in allowed]


# The text width names the architecture; it is the same in every layer, so any subset of a model's layers (a gate
# file for one stage) names the model it came from.
_ARCHITECTURES = {2048: "sdxl", 768: "sd1", 1024: "sd2"}


def architecture_name(sites: list[CrossAttnSite]) -> str:
    """A readable name for error messages and gate files: "sdxl", "sd1", "sd2", or a description."""
    dims = {s.context_dim for s in sites}
    levels = {s.level for s in sites if s.block != "middle"}
    if len(dims) == 1 and next(iter(dims)) in _ARCHITECTURES:
        return _ARCHITECTURES[next(iter(dims))]
    return f"unet(context={'/'.join(map(str, sorted(dims)))}, levels={'/'.join(map(str, sorted(levels)))})"
