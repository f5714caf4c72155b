"""MaskAttn Zero-Shot Gates: a training-free MASKATTN built from the prompt (masks/zeroshot.py has the maths).

    CLIP + prompt text -> MaskAttn Zero-Shot Gates -> maskattn -> Apply MaskAttn -> KSampler
                                                 |-> grouping (STRING: the groups it used, editable)
                                                 \\-> conditioning (the prompt encoded: the KSampler's positive)
"""

from __future__ import annotations

import logging

from ..masks.prompt import GroupingError
from ..masks.source import kind_of
from ..masks.topology import STAGE_CHOICES
from ..masks.zeroshot import (
    DEFAULT_END_TOKENS,
    DEFAULT_LAYOUT,
    DEFAULT_PARTITION,
    DEFAULT_SELF_ATTENTION,
    DEFAULT_STAGE,
    DEFAULT_START_PERCENT,
    END_TOKENS,
    LAYOUTS,
    PARTITIONS,
    SELF_ATTENTION,
    ZeroShotGates,
    build_zero_shot_gates,
)
from .tokens import clip_tokens

CATEGORY = "MaskAttn"
NOTICE_EVENT = "maskattn.notice"  # websocket event: a message for one node's canvas text
log = logging.getLogger("MaskAttn")

def send_notice(unique_id, message: str) -> None:
    """Show `message` on the node `unique_id` in the browser (web/maskattn.js), if a server is running."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and unique_id is not None:
        server.send_sync(NOTICE_EVENT, {"node": str(unique_id), "text": message}, getattr(server, "client_id", None))


class MaskAttnZeroShotGates:
    DESCRIPTION = (
        "Training-free MaskAttn gates (not the paper's learned gates): splits the prompt into entity groups (an "
        "object with its attributes) and, while sampling, gates each latent location to the group it attends to "
        "most, so the other groups' words cannot leak there. Connect maskattn to 'Apply MaskAttn' and conditioning "
        "to the KSampler's positive input: then the gated prompt is exactly the sampled one."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASKATTN", "STRING", "CONDITIONING")
    RETURN_NAMES = ("maskattn", "grouping", "conditioning")
    OUTPUT_TOOLTIPS = ("Zero-shot gates for 'Apply MaskAttn'.",
                       "The grouping used (first line), with notes; copy the first line into 'groups' to correct it.",
                       "The prompt encoded with this CLIP (as CLIP Text Encode does): the KSampler's positive.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP that encodes the prompt (its tokenizer maps words to tokens)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": False,  # must equal the encoded text
                                    "tooltip": "The positive prompt. Use the conditioning output as the KSampler's "
                                               "positive, or encode exactly this text yourself."}),
                "stage": (list(STAGE_CHOICES), {"default": DEFAULT_STAGE,
                                                "tooltip": "Which layers to gate: mid (SDXL 32x32 at 1024 px) is where "
                                                           "cross-attention maps are most object-like."}),
                "start_percent": ("FLOAT", {"default": DEFAULT_START_PERCENT, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Leave the first part of the schedule ungated: there the "
                                                       "attention is still noise and the layout not settled. With a "
                                                       "layout from the prompt, its places gate from the first step "
                                                       "and the attention takes over here. Apply MaskAttn uses the "
                                                       "later of its own start_percent and this."}),
            },
            "optional": {
                "groups": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Override the grouping: e.g. 'red book | yellow vase' (groups split "
                                                 "by | or new lines, words by spaces, # starts a comment). Empty: "
                                                 "automatic."}),
                "partition": (list(PARTITIONS), {"default": DEFAULT_PARTITION,
                                                 "tooltip": "aggregate (v2): each location's group from attention "
                                                            "averaged over the gated layers and the steps so far, "
                                                            "from the first step; layer (v1): this layer's attention "
                                                            "at this step only."}),
                "end_tokens": (list(END_TOKENS), {"default": DEFAULT_END_TOKENS,
                                                  "tooltip": "keep: end/padding tokens visible everywhere; "
                                                             "hide_in_regions: hidden inside every group's region "
                                                             "(they carry the whole prompt)."}),
                "self_attention": (list(SELF_ATTENTION), {"default": DEFAULT_SELF_ATTENTION,
                                                          "tooltip": "separate_groups: a location in one group's "
                                                                     "region does not attend to another group's "
                                                                     "region (self-attention of the gated layers)."}),
                "layout": (list(LAYOUTS), {"default": DEFAULT_LAYOUT,
                                           "tooltip": "from the prompt: spatial words ('a cat to the left of a dog', "
                                                      "'a vase in the middle') place each group, from the first "
                                                      "step; from start_percent on, the model's own attention "
                                                      "decides within those places. off: no layout."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def build(self, clip, text, stage, start_percent, groups="", partition=DEFAULT_PARTITION,
              end_tokens=DEFAULT_END_TOKENS, self_attention=DEFAULT_SELF_ATTENTION, layout=DEFAULT_LAYOUT,
              unique_id=None):
        from .gates import NodeError

        node = "MaskAttn Zero-Shot Gates"
        if clip is None:
            raise NodeError(f"{node}: no CLIP connected (clip input). Connect the CLIP output of your checkpoint "
                            f"loader.")
        tokens, vocab = clip_tokens(clip, text)

        def notice(message: str) -> None:
            log.warning("%s", message)
            send_notice(unique_id, message)

        try:
            gates = build_zero_shot_gates(text, tokens, vocab, groups_text=groups or "", stage=stage,
                                          start_percent=start_percent, partition=partition, end_tokens=end_tokens,
                                          self_attention=self_attention, layout=layout, notice=notice)
        except GroupingError as e:
            raise NodeError(f"{node}: groups: {e}. Use words of the prompt, groups split by |.") from None
        description = gates.describe()
        idle = gates.nothing_to_separate()
        if idle:
            log.warning("%s: %s.", node, idle)
            description = f"{description}\n# NOTHING TO SEPARATE: {idle}."
        conditioning = encode(clip, text)
        return {"ui": {"text": [description]}, "result": (gates, description, conditioning)}


def encode(clip, text: str):
    """The CONDITIONING that ComfyUI's own CLIP Text Encode makes of `text` (the same code, so the same tensors)."""
    import nodes as comfy_nodes

    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


MASK_OUTPUTS = 4  # mask_1 .. mask_4 for direct wiring; `masks` holds every group


#: Zero-Shot Masks' background choices: the regions as found, or every pixel given to the group that wins it.
BACKGROUND = ("left out", "to its winning group")


class MaskAttnZeroShotMasks:
    DESCRIPTION = (
        "The partition zero-shot gates found in the last sampling run, as masks at image size: one per group (for "
        "Conditioning Set Mask, IPAdapter's attn_mask, ControlNet or inpainting), and how much of each word's "
        "attention fell inside its group's region (its leakage), and the layout the prompt's spatial words gave each "
        "group. Connect the sampled image or latent so it runs after the sampler."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK",) * (MASK_OUTPUTS + 1) + ("STRING", "MASK")
    RETURN_NAMES = ("masks",) + tuple(f"mask_{i + 1}" for i in range(MASK_OUTPUTS)) + ("leakage", "layout")
    OUTPUT_TOOLTIPS = ("Every group's region, one mask per group (in the grouping's order).",) + tuple(
        f"Group {i + 1}'s region (all zero when there is no such group)." for i in range(MASK_OUTPUTS)) + (
        "Per word: the share of its attention inside its group's region and the share that leaks outside.",
        "The place the prompt's spatial words gave each group, one soft mask per group (all ones without a layout).")
    FUNCTION = "masks"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"maskattn": ("MASKATTN", {"tooltip": "The zero-shot gates the sampled model was applied "
                                                              "with."})},
            "optional": {
                "image": ("IMAGE", {"tooltip": "The decoded image: sets the masks' size, runs this node after the "
                                               "sampler."}),
                "latent": ("LATENT", {"tooltip": "Or the sampled latent (masks at 8x its size)."}),
                "batch_index": ("INT", {"default": 0, "min": 0, "max": 4096,
                                        "tooltip": "Which image of the batch."}),
                "background": (list(BACKGROUND), {
                    "default": BACKGROUND[0],
                    "tooltip": "left out: where no group is strong, no mask (the regions). to its winning group: "
                               "every pixel goes to the group that wins it in the run's aggregate, so the masks "
                               "tile the image: about where the gates kept each group's words."}),
            },
        }

    def masks(self, maskattn, image=None, latent=None, batch_index=0, background=BACKGROUND[0]):
        import torch

        from .gates import NodeError

        node = "MaskAttn Zero-Shot Masks"
        if not isinstance(maskattn, ZeroShotGates):
            raise NodeError(f"{node}: maskattn: connect the output of 'MaskAttn Zero-Shot Gates' (got "
                            f"{kind_of(maskattn)} gates, which have no partition).")
        if image is not None:
            height, width = int(image.shape[1]), int(image.shape[2])
        elif latent is not None:
            height, width = 8 * int(latent["samples"].shape[-2]), 8 * int(latent["samples"].shape[-1])
        else:
            raise NodeError(f"{node}: connect the sampled image or latent (it sets the masks' size and makes this "
                            f"node run after the sampler).")
        if background not in BACKGROUND:
            raise NodeError(f"{node}: background must be one of {list(BACKGROUND)}, got {background!r}.")
        groups = max(len(maskattn.groups), 1)
        layout = maskattn.layout_masks(height, width)
        layout = torch.ones(groups, height, width) if layout is None else layout  # no layout: each group anywhere
        regions = maskattn.region_masks(height, width, cover_background=background == BACKGROUND[1])
        if regions is None:
            message = ("no sampling run with these zero-shot gates was seen yet (or they have fewer than two groups): "
                       "the masks are empty")
            log.warning("%s: %s.", node, message)
            empty = torch.zeros(groups, height, width)
            return {"ui": {"text": [message]}, "result": (empty,) + tuple(
                torch.zeros(1, height, width) for _ in range(MASK_OUTPUTS)) + (message, layout)}
        index = min(batch_index, regions.shape[0] - 1)
        per_group = regions[index].cpu()  # [G, H, W]
        singles = tuple(per_group[i:i + 1] if i < per_group.shape[0] else torch.zeros(1, height, width)
                        for i in range(MASK_OUTPUTS))
        labels = maskattn.group_labels()
        leakage = maskattn.leakage_text()
        text = "\n".join([f"mask_{i + 1}: {label}" for i, label in enumerate(labels)] + [leakage])
        return {"ui": {"text": [text]}, "result": (per_group,) + singles + (leakage, layout)}


NODE_CLASS_MAPPINGS = {"MaskAttnZeroShotGates": MaskAttnZeroShotGates, "MaskAttnZeroShotMasks": MaskAttnZeroShotMasks}
NODE_DISPLAY_NAME_MAPPINGS = {"MaskAttnZeroShotGates": "MaskAttn Zero-Shot Gates",
                              "MaskAttnZeroShotMasks": "MaskAttn Zero-Shot Masks"}
