"""MaskAttn Zero-Shot Gates: a training-free MASKATTN built from the prompt (masks/zeroshot.py has the maths).

    CLIP + prompt text -> MaskAttn Zero-Shot Gates -> maskattn -> Apply MaskAttn -> KSampler
                                                 \\-> grouping (STRING: the groups it used, editable)
"""

from __future__ import annotations

from ..masks.topology import STAGE_CHOICES
from ..masks.zeroshot import DEFAULT_STAGE, DEFAULT_START_PERCENT, GroupingError, build_zero_shot_gates

CATEGORY = "MaskAttn"

_fallback_vocab: dict | None = None


def clip_vocab(clip, encoder: str) -> dict[int, str]:
    """Token id -> BPE string of the CLIP's tokenizer for `encoder` ("l", "g", ...); every SD text encoder uses the
    same CLIP BPE vocabulary, so the host's stock CLIP-L tokenizer serves when the CLIP object hides its own."""
    global _fallback_vocab
    sub = getattr(getattr(clip, "tokenizer", None), f"clip_{encoder}", None)
    inv = getattr(sub, "inv_vocab", None)
    if isinstance(inv, dict) and inv:
        return inv
    if _fallback_vocab is None:
        import comfy.sd1_clip

        _fallback_vocab = comfy.sd1_clip.SDTokenizer().inv_vocab
    return _fallback_vocab


def tokenize(clip, text: str) -> dict:
    try:
        tokens = clip.tokenize(text, return_word_ids=True)
    except TypeError:  # a CLIP wrapper without the keyword
        tokens = clip.tokenize(text)
    if not isinstance(tokens, dict):
        tokens = {"l": tokens}
    return tokens


class MaskAttnZeroShotGates:
    DESCRIPTION = (
        "Training-free MaskAttn gates (not the paper's learned gates): splits the prompt into entity groups (an "
        "object with its attributes) and, while sampling, gates each latent location to the group it attends to "
        "most, so the other groups' words cannot leak there. Connect to 'Apply MaskAttn' like loaded gates. The "
        "prompt here must be the positive prompt you encode."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASKATTN", "STRING")
    RETURN_NAMES = ("maskattn", "grouping")
    OUTPUT_TOOLTIPS = ("Zero-shot gates for 'Apply MaskAttn'.",
                       "The grouping used (first line), with notes; copy the first line into 'groups' to correct it.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP that encodes the prompt (its tokenizer maps words to tokens)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": False,  # must equal the encoded text
                                    "tooltip": "The positive prompt, exactly as encoded for the KSampler."}),
                "stage": (list(STAGE_CHOICES), {"default": DEFAULT_STAGE,
                                                "tooltip": "Which layers to gate: mid (SDXL 32x32 at 1024 px) is where "
                                                           "cross-attention maps are most object-like."}),
                "start_percent": ("FLOAT", {"default": DEFAULT_START_PERCENT, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Leave the first part of the schedule ungated: there the "
                                                       "attention is still noise and the layout not settled. Apply "
                                                       "MaskAttn uses the later of its own start_percent and this."}),
            },
            "optional": {
                "groups": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Override the grouping: e.g. 'red book | yellow vase' (groups split "
                                                 "by | or new lines, words by spaces, # starts a comment). Empty: "
                                                 "automatic."}),
            },
        }

    def build(self, clip, text, stage, start_percent, groups=""):
        from .gates import NodeError

        if clip is None:
            raise NodeError("MaskAttn Zero-Shot Gates: no CLIP connected (clip input).")
        tokens = tokenize(clip, text)
        vocab = clip_vocab(clip, "l" if "l" in tokens else next(iter(tokens)))
        try:
            gates = build_zero_shot_gates(text, tokens, vocab, groups_text=groups or "", stage=stage,
                                          start_percent=start_percent)
        except GroupingError as e:
            raise NodeError(f"MaskAttn Zero-Shot Gates: groups: {e}. Use words of the prompt, groups split by "
                            f"|.") from None
        description = gates.describe()
        return {"ui": {"text": [description]}, "result": (gates, description)}


NODE_CLASS_MAPPINGS = {"MaskAttnZeroShotGates": MaskAttnZeroShotGates}
NODE_DISPLAY_NAME_MAPPINGS = {"MaskAttnZeroShotGates": "MaskAttn Zero-Shot Gates"}
