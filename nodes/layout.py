"""MaskAttn Layout from Prompt: the prompt's spatial words as one MASK per object (masks/layout.py has the maths).

    text ("a red cube to the left of a blue sphere") + size -> mask_1 .. mask_4, phrases, summary
        -> MaskAttn Region Gates (phrases + masks), Conditioning (Set Mask), an attention couple, IPAdapter's attn_mask
"""

from __future__ import annotations

import logging

from ..masks.layout import layout_prior, parse_layout
from ..masks.prompt import GroupingError, grouping_for, token_group_map
from .tokens import clip_tokens

CATEGORY = "MaskAttn"
NODE = "MaskAttn Layout from Prompt"
MASK_OUTPUTS = 4
log = logging.getLogger("MaskAttn")


class MaskAttnLayoutFromPrompt:
    DESCRIPTION = (
        "Reads where the prompt puts each object ('a red cube to the left of a blue sphere', 'a vase in the middle') "
        "and gives one soft MASK per object at the image size, the objects' phrases (one per line, as Region Gates "
        "takes them) and a summary. Feed them to MaskAttn Region Gates, Conditioning (Set Mask), an attention couple "
        "or IPAdapter's attn_mask. An object the prompt does not place gets a full mask."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK",) * MASK_OUTPUTS + ("STRING", "STRING")
    RETURN_NAMES = tuple(f"mask_{i + 1}" for i in range(MASK_OUTPUTS)) + ("phrases", "summary")
    OUTPUT_TOOLTIPS = tuple(f"Object {i + 1}'s place (all zero when there is no such object)."
                            for i in range(MASK_OUTPUTS)) + (
        "The objects' phrases, one per line, in the masks' order (Region Gates' phrases).",
        "One line per object ('red cube: left half'), then what gave no layout and why.")
    FUNCTION = "layout"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text": ("STRING", {"multiline": True, "dynamicPrompts": False,
                                    "tooltip": "The prompt whose spatial words place the objects."}),
                "width": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8,
                                  "tooltip": "The image width (a multiple of 8)."}),
                "height": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8,
                                   "tooltip": "The image height (a multiple of 8)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional: the CLIP that encodes the prompt; objects whose words it has "
                                             "no tokens for are left out, as the zero-shot gates leave them out."}),
                "groups": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Override the objects: e.g. 'red cube | blue sphere' (words of the "
                                                 "prompt, groups split by |). Empty: automatic."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def layout(self, text, width, height, clip=None, groups="", unique_id=None):
        import torch

        from .gates import NodeError
        from .zeroshot import send_notice

        for name, value in (("width", width), ("height", height)):
            if int(value) <= 0 or int(value) % 8:
                raise NodeError(f"{NODE}: {name} is {value}; it must be a positive multiple of 8 (the latent is "
                                f"1/8 of the image). Use the size of your Empty Latent Image.")
        try:
            grouping = grouping_for(text, groups)
        except GroupingError as e:
            raise NodeError(f"{NODE}: groups: {e}. Use words of the prompt, groups split by |.") from None
        placed = list(range(len(grouping.groups)))
        if clip is not None:
            tokens, vocab = clip_tokens(clip, text)
            token_groups, _ = token_group_map(grouping, tokens, vocab)
            placed = sorted({g for g in token_groups if g >= 0})
        if len(placed) > MASK_OUTPUTS:
            words = grouping.group_words()
            merged = [" ".join(words[g]) for g in placed[:MASK_OUTPUTS - 1]] + [
                " ".join(w for g in placed[MASK_OUTPUTS - 1:] for w in words[g])]
            raise NodeError(f"{NODE}: text: the prompt has {len(placed)} objects ({grouping.describe()}); this node "
                            f"gives at most {MASK_OUTPUTS} masks. Merge objects in 'groups' (e.g. "
                            f"'{' | '.join(merged)}') or name fewer objects.")
        layout = parse_layout(grouping)
        masks = layout_prior(layout, placed, int(height), int(width))
        outputs = tuple(masks[i:i + 1] if i < len(placed) else torch.zeros(1, int(height), int(width))
                        for i in range(MASK_OUTPUTS))
        labels = [layout.labels[g] for g in placed]
        lines = layout.summary_lines(placed) or ["no spatial words found: every object gets the whole image"]
        summary = "\n".join(lines)
        for note in layout.notes:
            log.warning("%s: %s.", NODE, note)
            send_notice(unique_id, f"{NODE}: {note}.")
        return {"ui": {"text": [summary]}, "result": outputs + ("\n".join(labels), summary)}


NODE_CLASS_MAPPINGS = {"MaskAttnLayoutFromPrompt": MaskAttnLayoutFromPrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"MaskAttnLayoutFromPrompt": NODE}
