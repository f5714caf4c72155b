"""See the gates: "MaskAttn Record Gates" (opt-in recording) and "MaskAttn Preview Gates" (grid, masks, viewer).

    Apply MaskAttn -> MaskAttn Record Gates -> KSampler -> VAE Decode -> MaskAttn Preview Gates
                                  \\______________ MODEL ______________________/^

Record Gates returns a clone of the patched MODEL that carries a GateRecorder (masks/record.py) in its
transformer_options; every gated cross-attention call of a sampling run is handed to it through the runtime's
observer list. Preview Gates reads the last run of that recorder after sampling, labels the token columns with
the words of the prompt, and returns a titled IMAGE grid (rows = layers or steps, columns = tokens), one MASK per
token, the grid as a `ui` image, and writes the whole record (small uint8 maps) to a JSON file in ComfyUI's temp
folder, named in the node's `ui` output, from which web/maskattn.js draws the interactive viewer on the node. The
`ui` output is what ComfyUI re-sends when it serves the node from its cache, and the file name is what the browser
keeps in the node's properties across a page reload, so the viewer always shows the last run.

This module holds the nodes, the prompt tracing, the temp files; what is shown is chosen in masks/viewer.py, drawn
in masks/render.py, and the prompt's words come from masks/tokens.py (through nodes/tokens.py's CLIP helper).
"""

from __future__ import annotations

import json
import logging
import os
import uuid

import torch

from ..masks import render, viewer
from ..masks.record import DEFAULT_CAP_BYTES, DEFAULT_MAX_SIDE, GateRecorder
from ..masks.runtime import OBSERVERS_KEY
from ..masks.tokens import prompt_words
from ..masks.viewer import ViewerInputError
from . import hooks
from .gates import NodeError
from .tokens import clip_tokens

log = logging.getLogger("MaskAttn")
CATEGORY = "MaskAttn"
RECORDER_KEY = "maskattn_recorder"  # transformer_options entry; ComfyUI hands it to every hook as extra_options[...]
VIEWER_KEY = "maskattn_viewer"  # `ui` entry: [{"filename", "subfolder", "type"}] of the viewer's data, or [{"message"}]


# --- recording -----------------------------------------------------------------------------------------------------
def model_recorder(model) -> GateRecorder | None:
    return model.model_options.get("transformer_options", {}).get(RECORDER_KEY)


class MaskAttnRecordGates:
    DESCRIPTION = ("Records what MaskAttn's gates do while the returned model samples (hard gates and gate "
                   "probabilities, on the CPU, for the positive prompt), for 'MaskAttn Preview Gates'. Memory stays "
                   "under cap_mb per run: older steps are merged when it fills.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "record"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL from 'Apply MaskAttn'."}),
                "layers": ("STRING", {"default": "all", "tooltip": "all, a stage (high, mid, low), or layer names "
                                                                   "such as input.7.0, output.1"}),
                "steps": ("STRING", {"default": "all", "tooltip": "all, or step indices such as 0, 5, 10-19"}),
                "record_uncond": ("BOOLEAN", {"default": False, "tooltip": "Also keep the negative prompt's gates."}),
                "max_side": ("INT", {"default": DEFAULT_MAX_SIDE, "min": 4, "max": 128, "step": 4,
                                     "tooltip": "Maps are area-averaged to at most this many latent cells a side."}),
                "cap_mb": ("INT", {"default": DEFAULT_CAP_BYTES // 2**20, "min": 1, "max": 4096,
                                   "tooltip": "Most memory one run's record may use (MiB); older steps are merged."}),
            }
        }

    def record(self, model, layers, steps, record_uncond, max_side, cap_mb):
        node = "MaskAttn Record Gates"
        runtime = hooks.installed_runtime(model)
        if runtime is None:
            raise NodeError(f"{node}: this model is not patched by MaskAttn, so there are no gates to record. Connect "
                            f"the MODEL output of 'Apply MaskAttn' to this node.")
        gated = [s for s in hooks.model_sites(model) if s.key in runtime.sites]
        try:
            chosen, _ = viewer.select_layers(layers, gated, node)
            recorded_steps = viewer.parse_steps(steps, node)
        except ViewerInputError as e:
            raise NodeError(str(e)) from None
        recorder = GateRecorder({s.key for s in chosen}, recorded_steps, uncond=record_uncond,
                                max_side=max_side, cap_bytes=int(cap_mb) * 2**20)
        recorder.source = viewer.gate_source_label(runtime.gates)
        recorded = model.clone()
        options = recorded.model_options.setdefault("transformer_options", {})
        options[RECORDER_KEY] = recorder
        # (this clone's own observers: the runtime is shared with the input model, which stays unrecorded)
        options[OBSERVERS_KEY] = (*options.get(OBSERVERS_KEY, ()), recorder)
        recorded.set_model_attn2_patch(RecorderClock(recorder))
        return (recorded,)


class RecorderClock:
    """attn2_patch of a recorded model: shows the recorder every model call, gated or not (GateRecorder.tick), so a
    run interrupted before its end is not continued by the next one. Changes nothing."""

    def __init__(self, recorder: GateRecorder):
        self.recorder = recorder

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        self.recorder.tick(extra_options)
        return n, context, value


# --- the prompt's text ------------------------------------------------------------------------------------------------
_TEXT_INPUTS = ("text", "text_g", "text_l", "prompt", "value", "string")


def traced_prompt_text(prompt, unique_id, input_name="conditioning", depth=8):
    """The text of the encoder node that feeds this node's `conditioning` input, read from the queued prompt."""
    if not isinstance(prompt, dict) or unique_id is None:
        return None
    node = prompt.get(str(unique_id))
    link = (node or {}).get("inputs", {}).get(input_name)
    for _ in range(depth):
        if not (isinstance(link, list) and len(link) == 2):
            return None
        source = prompt.get(str(link[0])) or {}
        inputs = source.get("inputs", {})
        for name in _TEXT_INPUTS:
            value = inputs.get(name)
            if isinstance(value, str):
                return value
            if isinstance(value, list) and len(value) == 2:  # a text coming from another node: follow it once
                src = (prompt.get(str(value[0])) or {}).get("inputs", {})
                for inner in _TEXT_INPUTS:
                    if isinstance(src.get(inner), str):
                        return src[inner]
        link = inputs.get("conditioning") or inputs.get("conditioning_to")
    return None


# --- temp files ------------------------------------------------------------------------------------------------------
def save_temp(img, prefix="maskattn"):
    """Save a PIL image where PreviewImage puts its images; returns the `ui` image entry."""
    import folder_paths

    out_dir = folder_paths.get_temp_directory()
    full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{prefix}_{uuid.uuid4().hex[:8]}", out_dir, img.width, img.height)
    os.makedirs(full_folder, exist_ok=True)
    name = f"{filename}_{counter:05}_.png"
    img.save(os.path.join(full_folder, name), compress_level=1)
    return {"filename": name, "subfolder": subfolder, "type": "temp"}


def save_viewer_data(payload: dict) -> dict:
    """Write the viewer's data where ComfyUI keeps temp images (served by /view); returns its `ui` entry."""
    import folder_paths

    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    name = f"maskattn_viewer_{uuid.uuid4().hex[:12]}.json"
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(payload, f, separators=(",", ":"))
    return {"filename": name, "subfolder": "", "type": "temp"}


# --- the preview node ------------------------------------------------------------------------------------------------
class MaskAttnPreviewGates:
    DESCRIPTION = ("Shows MaskAttn's gates after sampling: for each layer, step and prompt word, which latent "
                   "locations keep that word (bright = kept), over the generated image. Needs the model from "
                   "'MaskAttn Record Gates'. Outputs a titled grid and one mask per word.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("grid", "masks")
    OUTPUT_NODE = True
    FUNCTION = "preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL from 'MaskAttn Record Gates' (the one the sampler used)."}),
                "layers": ("STRING", {"default": "mean", "tooltip": "mean (over all recorded layers), all (one row "
                                      "each), a stage (high, mid, low), mean:<stage>, or names such as input.7.0"}),
                "step": ("STRING", {"default": "mean",
                                    "tooltip": "mean, last, or a step index (0 = first, -1 = last)"}),
                "rows": (["layers", "steps"], {"default": "layers", "tooltip": "Grid rows: the chosen layers, or every "
                                                                              "recorded step (layers averaged)."}),
                "tokens": ("STRING", {"default": "", "tooltip": "Empty: every word of the prompt (padding skipped). "
                                                                "Or a comma list of words: cat, hat"}),
                "show": (["gate", "probability"], {"default": "gate", "tooltip": "gate: share of locations kept (hard "
                                                   "gate); probability: the gate's probability before the threshold"}),
                "opacity": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05}),
                "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The decoded image, drawn under the heatmaps."}),
                "latent": ("LATENT", {"tooltip": "Or the sampler's LATENT (sets the size when there is no image)."}),
                "conditioning": ("CONDITIONING", {"tooltip": "The positive conditioning: its prompt text labels the "
                                                             "token columns."}),
                "clip": ("CLIP", {"tooltip": "Tokenizes the text (default: CLIP-L's tokenizer)."}),
                "text": ("STRING", {"default": "", "multiline": True, "tooltip": "The prompt, when it cannot be read "
                                    "from the conditioning's text encoder."}),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def preview(self, model, layers, step, rows, tokens, show, opacity, batch_index, image=None, latent=None,
                conditioning=None, clip=None, text="", prompt=None, unique_id=None):
        node = "MaskAttn Preview Gates"
        run, message = self._run_or_message(model)
        if run is None:
            return self._message(message, unique_id)
        recorded = viewer.recorded_sites(hooks.model_sites(model), run)
        if not recorded:
            return self._message(f"{node}: nothing was recorded for this model's layers.", unique_id)
        prompt_text = text if text and text.strip() else (traced_prompt_text(prompt, unique_id) or "")
        try:
            grid = viewer.select_grid(run, recorded, prompt_words(*clip_tokens(clip, prompt_text)), layers=layers,
                                      step=step, rows=rows, tokens=tokens, show=show, batch_index=batch_index,
                                      node=node)
        except ViewerInputError as e:
            raise NodeError(str(e)) from None
        if not grid.row_maps:
            return self._message(f"{node}: the chosen layers/step were not recorded in this run ({run.summary()}). "
                                 f"Pick layers and steps that 'MaskAttn Record Gates' records.", unique_id)
        base = render.base_image(image, grid.batch_index)
        grid_image, _ = render.render_grid(grid.tiles, grid.row_labels, grid.column_labels, base, float(opacity),
                                           render.tile_width(len(grid.columns)))
        masks = viewer.word_masks(run, grid, viewer.output_size(image, latent, run.latent_size or grid.hw))

        ui_images = [save_temp(grid_image, "maskattn_grid")]
        base_ui = save_temp(render.thumbnail(base), "maskattn_base") if base is not None else None
        gates = hooks.installed_runtime(model).gates
        leakage, leakage_words = viewer.leakage_report(gates)
        payload = viewer.viewer_payload(run, recorded, grid.columns, grid.batch_index, base_ui, float(opacity), gates,
                                        leakage)
        summary = run.summary() + leakage_words
        if image is None and latent is None:
            summary += ("; connect the sampler's LATENT or the decoded IMAGE here so this node runs after sampling "
                        "(else it may show the previous run)")
        get_recorder = model_recorder(model)
        if get_recorder is not None:
            get_recorder.finish()
        return {"ui": {"images": ui_images, "text": [summary], VIEWER_KEY: [save_viewer_data(payload)]},
                "result": (render.to_image_tensor(grid_image), masks.clamp(0, 1).float())}

    @staticmethod
    def _run_or_message(model):
        node = "MaskAttn Preview Gates"
        recorder = model_recorder(model)
        if recorder is None:
            if hooks.installed_runtime(model) is None:
                return None, (f"{node}: this model is not patched by MaskAttn. Connect the MODEL from 'MaskAttn Record "
                              f"Gates' (placed after 'Apply MaskAttn') to this node and to the KSampler.")
            return None, (f"{node}: recording is off for this model. Put 'MaskAttn Record Gates' after 'Apply "
                          f"MaskAttn', feed its MODEL to the KSampler and to this node.")
        run = recorder.latest()
        if run is None or run.empty:
            return None, (f"{node}: nothing was recorded yet. The KSampler must sample with the MODEL of 'MaskAttn "
                          f"Record Gates' (the same one connected here), and the recorded layers/steps must run: "
                          f"steps before start_percent (Apply MaskAttn's, or the zero-shot gates' 0.2) are not gated, "
                          f"so sample more steps or lower it.")
        return run, None

    @staticmethod
    def _message(message, unique_id):
        log.info(message)
        img = render.message_image(message)
        ui = {"images": [save_temp(img, "maskattn_msg")], "text": [message], VIEWER_KEY: [{"message": message}]}
        return {"ui": ui,
                "result": (render.to_image_tensor(img), torch.zeros(1, 64, 64))}


NODE_CLASS_MAPPINGS = {
    "MaskAttnRecordGates": MaskAttnRecordGates,
    "MaskAttnPreviewGates": MaskAttnPreviewGates,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MaskAttnRecordGates": "MaskAttn Record Gates",
    "MaskAttnPreviewGates": "MaskAttn Preview Gates",
}
