"""MaskAttn Region Gates: phrases of one prompt, each kept only inside its MASK (masks/region.py has the maths).

    CLIP + prompt + phrases + MASKs -> MaskAttn Region Gates -> maskattn -> Apply MaskAttn -> KSampler
                                                            \\-> description (STRING: phrases, tokens, masks)

Four optional MASK sockets, phrase i going with mask_i: classic (V1) nodes cannot grow sockets without frontend code,
and one 77-token prompt rarely names more than three or four separately placed subjects; a fixed set of sockets
also keeps workflows loadable on every ComfyUI.
"""

from __future__ import annotations

from ..masks.region import (
    DEFAULT_END_TOKENS,
    DEFAULT_STAGE,
    END_TOKEN_MODES,
    RegionError,
    RegionPhraseError,
    build_region_gates,
)
from ..masks.topology import STAGE_CHOICES
from .tokens import clip_tokens

CATEGORY = "MaskAttn"
MASK_SOCKETS = 4
NODE = "MaskAttn Region Gates"


class MaskAttnRegionGates:
    DESCRIPTION = (
        "Regional prompting inside one prompt: write phrases of the prompt (one per line, or separated by |) and "
        "connect one MASK per phrase (mask_1 for the first phrase, ...). While sampling, each phrase's words are "
        "visible only inside its mask; the other words stay visible everywhere. Connect to 'Apply MaskAttn'. A "
        "MASK with one image serves every image of the batch; a batch of masks gives one per image."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASKATTN", "STRING")
    RETURN_NAMES = ("maskattn", "description")
    OUTPUT_TOOLTIPS = ("Region gates for 'Apply MaskAttn'.",
                       "The phrases, their token positions and masks, and the settings used.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        masks = {f"mask_{i}": ("MASK", {"tooltip": f"Where phrase {i} belongs (white = inside). Any resolution: it "
                                                   f"is stretched to the latent."})
                 for i in range(1, MASK_SOCKETS + 1)}
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP that encodes the prompt (its tokenizer maps words to tokens)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": False,  # must equal the encoded text
                                    "tooltip": "The positive prompt, exactly as encoded for the KSampler."}),
                "phrases": ("STRING", {"multiline": True, "default": "",
                                       "tooltip": "Phrases of the prompt, one per line or separated by |, e.g. "
                                                  "'red cube | blue sphere'. Phrase i goes with mask_i."}),
                "stage": (list(STAGE_CHOICES), {"default": DEFAULT_STAGE,
                                                "tooltip": "Which layers to gate. The layout is given, so every stage "
                                                           "can follow it; 'all' binds most firmly."}),
                "end_tokens": (list(END_TOKEN_MODES), {
                    "default": DEFAULT_END_TOKENS,
                    "tooltip": "The end and padding tokens summarise the whole prompt. keep: visible everywhere. "
                               "hide_in_regions: hidden inside the masks, so there only the region's own phrase "
                               "(and the words in no phrase) describe it."}),
            },
            "optional": masks,
        }

    def build(self, clip, text, phrases, stage, end_tokens, **masks):
        from .gates import NodeError

        if clip is None:
            raise NodeError(f"{NODE}: no CLIP connected (clip input). Connect your checkpoint loader's CLIP, the one "
                            f"that encodes this prompt.")
        from ..masks.region import split_phrases

        written = split_phrases(phrases)
        if not written:
            raise NodeError(f"{NODE}: phrases is empty. Write the phrases of the prompt to place, one per line or "
                            f"separated by |, and connect mask_1, mask_2, ... in the same order.")
        if len(written) > MASK_SOCKETS:
            raise NodeError(f"{NODE}: phrases has {len(written)} phrases; this node takes at most {MASK_SOCKETS} "
                            f"(one per mask socket). Merge phrases or drop some.")
        wanted = list(range(1, len(written) + 1))
        # an all-zero mask past the phrases places nothing: Layout from Prompt's outputs for objects a prompt lacks
        connected = [i for i in range(1, MASK_SOCKETS + 1) if masks.get(f"mask_{i}") is not None
                     and (i in wanted or bool(masks[f"mask_{i}"].any()))]
        if connected != wanted:
            missing = [f"mask_{i}" for i in wanted if i not in connected]
            extra = [f"mask_{i}" for i in connected if i not in wanted]
            problems = ([f"{', '.join(missing)} not connected" if missing else ""]
                        + [f"{', '.join(extra)} connected but there is no phrase {extra[0][5:]}" if extra else ""])
            raise NodeError(f"{NODE}: {len(written)} phrase(s) ({' | '.join(written)}) need mask_1..mask_"
                            f"{len(written)}, one per phrase in order; {'; '.join(p for p in problems if p)}. "
                            f"Connect a MASK for each phrase, or add/remove phrases.")
        names = [f"mask_{i}" for i in wanted]
        tokens, vocab = clip_tokens(clip, text)
        try:
            gates = build_region_gates(text, tokens, vocab, written, [masks[n] for n in names], stage=stage,
                                       end_tokens=end_tokens, mask_names=names)
        except RegionError as e:  # a mask error names its mask_i itself; a phrase error is about the phrases input
            where = "phrases: " if isinstance(e, RegionPhraseError) else ""
            raise NodeError(f"{NODE}: {where}{e}. {e.fix}".rstrip()) from None
        description = gates.describe()
        return {"ui": {"text": [description]}, "result": (gates, description)}


NODE_CLASS_MAPPINGS = {"MaskAttnRegionGates": MaskAttnRegionGates}
NODE_DISPLAY_NAME_MAPPINGS = {"MaskAttnRegionGates": NODE}
