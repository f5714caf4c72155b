"""The "Train MaskAttn Gates" node: a thin front door to the one training run (nodes/gate_training.py, whose loop,
defaults and objectives live in ../masks/train.py and ../masks/objectives.py). Here: the node's inputs (mask
supervision from MASK sockets), ComfyUI's progress bar and cancel, and the loss-curve image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..masks.context import GATE_KINDS
from ..masks.objectives import OBJECTIVES, get_objective
from ..masks.supervised import MASK_OUTSIDE, ObjectMasks, object_masks
from ..masks.topology import PLACEMENTS, STAGE_CHOICES
from ..masks.train import TRAIN_DEFAULTS, TrainConfig, resolve_mask_steps, resolve_warmup
from . import gate_training, hooks
from .training_examples import TrainingInputError, prepare_examples
from .region import MASK_SOCKETS

CATEGORY = "MaskAttn"


# --- the loss-curve image -----------------------------------------------------------------------------------------
def loss_curve_image(
    values: list[float], width: int = 640, height: int = 360, title: str = "MaskAttn gate training"
) -> Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] plotting the loss per step (light) and its moving average (dark)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw_ = ImageDraw.Draw(img)
    left, right, top, bottom = 64, width - 16, 28, height - 36
    draw_.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw_.text((left, 8), title, fill=(0, 0, 0))
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
        n = len(values)

        def xy(i, v):
            x = left + (right - left) * (i / max(1, n - 1))
            y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
            return x, y

        pts = [xy(i, v) for i, v in enumerate(values) if math.isfinite(v)]
        if len(pts) > 1:
            draw_.line(pts, fill=(160, 190, 230), width=1)
        ema, smooth = None, []
        beta = 0.9 if n < 200 else 0.98
        for v in values:
            if math.isfinite(v):
                ema = v if ema is None else beta * ema + (1 - beta) * v
            smooth.append(ema)
        spts = [xy(i, v) for i, v in enumerate(smooth) if v is not None]
        if len(spts) > 1:
            draw_.line(spts, fill=(20, 60, 160), width=2)
        for frac in (0.0, 0.5, 1.0):
            v = lo + (hi - lo) * frac
            y = bottom - (bottom - top) * frac
            draw_.text((4, y - 6), f"{v:.4g}", fill=(0, 0, 0))
        draw_.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
        draw_.text((right - 60, bottom + 8), f"step {n}", fill=(0, 0, 0))
        draw_.text((right - 200, 8), f"last {finite[-1]:.4g}  min {min(finite):.4g}", fill=(0, 0, 0))
    else:
        draw_.text((left + 8, (top + bottom) // 2), "no finite loss values", fill=(200, 0, 0))
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


# --- the node -------------------------------------------------------------------------------------------------------
NODE = "Train MaskAttn Gates"


def _per_image(lines: list[str], n: int, what: str) -> list[str]:
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise TrainingInputError(f"{what}: {len(lines)} lines for {n} images; write one line per image or one for all")
    return lines


def node_object_masks(clip, captions: str, phrases: str, masks: list, n: int) -> list[ObjectMasks | None]:
    """The node's mask inputs -> one ObjectMasks per image (None for an image without phrases).

    captions: the encoded texts, one line per image (or one line for all); phrases: one line per image (or one for
    all), phrases separated by "|", phrase i of a line going with mask_i; mask_i: a MASK batch of one per image or one
    for all.
    """
    from ..masks.region import split_phrases
    from .tokens import clip_tokens

    if clip is None:
        raise TrainingInputError("clip: connect the CLIP that encoded the captions (it maps phrases to tokens)")
    caption_lines = [c.strip() for c in (captions or "").splitlines() if c.strip()]
    phrase_lines = [line for line in (phrases or "").splitlines() if line.split("#", 1)[0].strip()]
    if not caption_lines:
        raise TrainingInputError("captions: write the caption of each image (one line per image), as encoded")
    if not phrase_lines:
        raise TrainingInputError("phrases: write each image's object phrases ('red cube | blue sphere'), one line "
                                 "per image or one for all, phrase i going with mask_i")
    caption_lines = _per_image(caption_lines, n, "captions")
    phrase_lines = _per_image(phrase_lines, n, "phrases")
    for i, m in enumerate(masks, 1):
        if m is not None and (m.ndim not in (2, 3) or (m.ndim == 3 and m.shape[0] not in (1, n))):
            raise TrainingInputError(f"mask_{i}: a MASK of shape {tuple(m.shape)}; give one mask per image ({n}) "
                                     f"or one for all")
    out = []
    for j in range(n):
        written = split_phrases(phrase_lines[j])
        if not written:
            out.append(None)
            continue
        if len(written) > MASK_SOCKETS:
            raise TrainingInputError(f"phrases line {j + 1}: {len(written)} phrases; at most {MASK_SOCKETS}")
        missing = [f"mask_{i}" for i in range(1, len(written) + 1) if masks[i - 1] is None]
        if missing:
            raise TrainingInputError(f"phrases line {j + 1} has {len(written)} phrase(s) ({' | '.join(written)}) "
                                     f"but {', '.join(missing)} is not connected")
        planes = []
        for i in range(len(written)):
            m = masks[i]
            planes.append(m if m.ndim == 2 else m[j if m.shape[0] == n else 0])
        tokens, vocab = clip_tokens(clip, caption_lines[j])
        try:
            out.append(object_masks(caption_lines[j], written, planes, tokens, vocab))
        except ValueError as e:
            raise TrainingInputError(f"image {j + 1}: {e}. Use words of that image's caption in its phrases") from None
    return out


def _run_inputs() -> dict:
    d = TRAIN_DEFAULTS
    return {
        "model": ("MODEL", {"tooltip": "The model to train gates for (frozen during training)."}),
        "latents": ("LATENT", {"tooltip": "Encoded training images (VAE Encode), one per caption."}),
        "positive": (
            "CONDITIONING",
            {
                "tooltip": "One conditioning per image, in the latent batch's order, "
                "or a single one for all images."
            },
        ),
        "steps": ("INT", {"default": d["steps"], "min": 1, "max": 1000000}),
        "batch_size": ("INT", {"default": d["batch_size"], "min": 1, "max": 256}),
        "learning_rate": ("FLOAT", {"default": d["lr"], "min": 1e-7, "max": 1.0, "step": 1e-5}),
        "stage": (
            list(STAGE_CHOICES),
            {
                "default": d["stage"],
                "tooltip": "Which cross-attention layers get gates (ignored when continuing from maskattn).",
            },
        ),
        "placement": (list(PLACEMENTS), {"default": d["placement"]}),
        "hidden_size": (
            "INT",
            {
                "default": d["hidden"],
                "min": 4,
                "max": 1024,
                "step": 4,
                "tooltip": "Gate MLP width (the method: 128). Ignored when continuing.",
            },
        ),
        "seed": ("INT", {"default": d["seed"], "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
    }


def _continue_inputs() -> dict:
    d = TRAIN_DEFAULTS
    return {
        "maskattn": (
            "MASKATTN",
            {"tooltip": "Continue training these gates (a copy; the input is unchanged)."},
        ),
        "warmup_steps": (
            "INT",
            {
                "default": d["warmup"],
                "min": -1,
                "max": 100000,
                "tooltip": "Linear learning-rate warmup, then cosine decay. "
                f"-1: {d['warmup_fraction']:.0%} of steps.",
            },
        ),
        "objective": (
            list(OBJECTIVES),
            {
                "default": d["objective"],
                "tooltip": "How the gates learn. "
                + "; ".join(f"{o.name}: {o.summary}" for o in OBJECTIVES.values()),
            },
        ),
        "head": (
            list(GATE_KINDS),
            {
                "default": d["head"],
                "tooltip": "Which gate head to train. reference: the paper's head (layer features and text). "
                "context: the same plus the run's own running attention over layers and steps, which tells apart "
                "locations that look alike but belong to different objects (beyond the paper). Must match the "
                "maskattn input when continuing.",
            },
        ),
    }


def _mask_supervision_inputs() -> dict:
    d = TRAIN_DEFAULTS
    masks = {
        f"mask_{i}": ("MASK", {"tooltip": f"Where phrase {i} of each image's phrases line is (one mask per "
                                          f"image, or one for all)."})
        for i in range(1, MASK_SOCKETS + 1)
    }
    return {
        "clip": ("CLIP", {"tooltip": "Mask supervision: the CLIP that encoded the captions."}),
        "captions": (
            "STRING",
            {"multiline": True, "default": "", "dynamicPrompts": False,
             "tooltip": "Mask supervision: each image's caption as encoded, one line per image (or one)."},
        ),
        "phrases": (
            "STRING",
            {"multiline": True, "default": "", "dynamicPrompts": False,
             "tooltip": "Mask supervision: each image's object phrases, 'red cube | blue sphere', one line "
             "per image (or one for all); phrase i goes with mask_i."},
        ),
        **masks,
        "mask_steps": (
            "INT",
            {
                "default": d["mask_steps"],
                "min": -1,
                "max": 1000000,
                "tooltip": "Mask supervision: the first N steps learn the masks, the rest the objective. "
                "-1: every step when masks are connected (none otherwise).",
            },
        ),
        "mask_outside": (
            list(MASK_OUTSIDE),
            {
                "default": d["mask_outside"],
                "tooltip": "Mask supervision, where no mask is (the background): keep: every object's "
                "words stay open there, so a word is closed only inside another object's mask; close: they "
                "are closed there too. Masks that tile the image make the two the same.",
            },
        ),
    }


class MaskAttnTrainGates:
    DESCRIPTION = (
        "Trains MaskAttn gate heads on your model; the model itself stays frozen. Give it encoded images (LATENT) and "
        "one conditioning per image. The objective picks how the gates learn (docs/TRAINING.md). "
        "Optionally, object masks per phrase (mask_1..mask_4, with the CLIP, the captions and the phrases) train the "
        "gates to keep each object's words on its mask (beyond the paper). Returns the gates and a loss curve."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASKATTN", "IMAGE")
    RETURN_NAMES = ("maskattn", "loss_curve")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _run_inputs(), "optional": {**_continue_inputs(), **_mask_supervision_inputs()}}

    def train(
        self,
        model,
        latents,
        positive,
        steps,
        batch_size,
        learning_rate,
        stage,
        placement,
        hidden_size,
        seed,
        maskattn=None,
        warmup_steps=TRAIN_DEFAULTS["warmup"],
        objective=TRAIN_DEFAULTS["objective"],
        clip=None,
        captions="",
        phrases="",
        mask_steps=TRAIN_DEFAULTS["mask_steps"],
        mask_outside=TRAIN_DEFAULTS["mask_outside"],
        head=TRAIN_DEFAULTS["head"],
        **masks,
    ):
        import comfy.model_management as mm
        import comfy.utils

        from .gates import NodeError

        seed = int(seed) % (1 << 63)
        planes = [masks.get(f"mask_{i}") for i in range(1, MASK_SOCKETS + 1)]
        supervised = any(m is not None for m in planes) or bool((phrases or "").strip())
        try:
            spec = get_objective(objective)
            with torch.inference_mode(False):
                gates = gate_training.start_gates(model, maskattn, stage=stage, placement=placement,
                                                  hidden=hidden_size, seed=seed, objective=spec.name, head=head)
                gates.check_fits(hooks.model_sites(model))
                examples = prepare_examples(model, latents, positive)
                if supervised:
                    examples = examples.with_objects(node_object_masks(clip, captions, phrases, planes, len(examples)))
            lead = resolve_mask_steps(mask_steps, steps, supervised)
            if lead and not supervised:
                raise TrainingInputError("mask_steps: no masks connected; connect mask_1.. with phrases and captions, "
                                         "or set mask_steps to -1")
            if lead and not any(o is not None for o in examples.objects):
                raise TrainingInputError("phrases: no image has a phrase (only '|', blanks or comments); write each "
                                         "image's object phrases ('red cube | blue sphere'), or set mask_steps to 0")
            config = TrainConfig(
                steps=steps,
                batch_size=batch_size,
                lr=learning_rate,
                seed=seed,
                warmup_steps=resolve_warmup(warmup_steps, steps),
                objective=spec.name,
                mask_steps=lead,
                mask_outside=mask_outside,
                head=head,
            )
        except (TrainingInputError, ValueError) as e:
            raise NodeError(f"{NODE}: {e}") from None
        pbar = comfy.utils.ProgressBar(steps)
        run = gate_training.train(
            model,
            examples,
            gates,
            config,
            on_step=lambda r: pbar.update_absolute(r.step, steps),
            should_stop=mm.throw_exception_if_processing_interrupted,
        )
        gates.source = f"trained in ComfyUI ({steps} steps, {spec.name}" + (
            f", {config.mask_steps} on masks, background {config.mask_outside})" if config.mask_steps else ")")
        gate_training.finished_gates(gates, steps)
        return (gates, loss_curve_image(run.history))


NODE_CLASS_MAPPINGS = {"MaskAttnTrainGates": MaskAttnTrainGates}
NODE_DISPLAY_NAME_MAPPINGS = {"MaskAttnTrainGates": "Train MaskAttn Gates"}
