"""Load / Apply / Save MaskAttn gates (classic V1 nodes, run by every ComfyUI)."""

from __future__ import annotations

import logging
import os
import re

from ..masks.gate import strength_to_negative_value
from ..masks.gatefile import GateFileError, load_gates, save_gates
from ..masks.gates import GateMismatchError, MaskAttnGates
from ..masks.source import HANDOVER_SIGMA, GateSource, kind_of
from ..masks.topology import PLACEMENTS, STAGE_CHOICES, UnsupportedModelError, select_sites
from . import hooks, paths

log = logging.getLogger("MaskAttn")

CATEGORY = "MaskAttn"


class NodeError(ValueError):
    """An error shown on the node: names the node, the input and the fix."""


# ComfyUI shows an error's type as `module.QualName`; a pack's module path reads as a filesystem path there.
NodeError.__module__ = "MaskAttn"


NO_GATES_HELP = (
    "No trained MaskAttn gates are published anywhere: train gates for your checkpoint ('Train MaskAttn Gates' "
    "then 'Save MaskAttn Gates', or `python -m cli.train`), or use training-free gates: connect 'MaskAttn Zero-Shot "
    "Gates' to Apply MaskAttn instead (workflows/maskattn_sdxl_viewer.json does)."
)


class MaskAttnLoadGates:
    DESCRIPTION = ("Loads MaskAttn gate heads from models/maskattn (.safetensors, or a reference .pt checkpoint). No "
                   "trained gates are published: train your own, or use 'MaskAttn Zero-Shot Gates'.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASKATTN",)
    RETURN_NAMES = ("maskattn",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"gate_name": (paths.gate_files(), {"tooltip": "A file in ComfyUI/models/maskattn/"})},
            "optional": {"maskattn": ("MASKATTN", {
                "tooltip": "Passed on only while this node is bypassed (Ctrl+B); ignored when it runs. The example "
                           "workflows chain the zero-shot gates through a bypassed loader, so un-bypassing it is the "
                           "one switch to learned gates."})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, gate_name):
        # Taking over the list check lets a missing file reach load(), whose message says what to do; ComfyUI's own
        # check would only say "not in []" before anything runs.
        return True

    @classmethod
    def IS_CHANGED(cls, gate_name):
        try:  # reload when the file is rewritten (e.g. by a training run) under the same name
            return os.path.getmtime(paths.gate_path(gate_name))
        except (OSError, FileNotFoundError):
            return float("nan")

    def load(self, gate_name, maskattn=None):
        if gate_name not in paths.gate_files():
            found = paths.gate_files()
            where = ", ".join(paths.gate_folders())
            listing = (f"The folder has: {', '.join(found[:8])}{' …' if len(found) > 8 else ''}; pick one in gate_name."
                       if found else f"The folder is empty. {NO_GATES_HELP}")
            raise NodeError(f"Load MaskAttn Gates: gate_name {gate_name!r} is not in {where}. {listing}")
        try:
            return (load_gates(paths.gate_path(gate_name)),)
        except (GateFileError, FileNotFoundError) as e:
            raise NodeError(f"Load MaskAttn Gates: {e}") from None


class MaskAttnApply:
    DESCRIPTION = (
        "Gates the model's cross-attention with MaskAttn: per layer, latent location and prompt token, a learned "
        "gate keeps or suppresses the connection. Returns a patched copy; the input model is not changed."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "maskattn": ("MASKATTN",),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "A pair is kept when the gate probability exceeds this "
                                                   "(method: 0.5)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "1 = the method. s < 1 multiplies each suppressed pair's attention "
                                                  "weight by (1 - s) before renormalising; 0 = untouched model."}),
                "stage": (list(STAGE_CHOICES), {"default": "all",
                                                "tooltip": "Gate only layers of this stage (of those the file has "
                                                           "heads for)."}),
                "placement": (list(PLACEMENTS), {"default": "encoder_decoder",
                                                 "tooltip": "Gate layers of the input and output blocks, or of one "
                                                            "side only."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Where in the schedule gating starts. A gate source with its "
                                                       "own start (zero-shot gates) uses the later of the two."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Where in the schedule gating ends."}),
            },
            "optional": {
                "gate_uncond": ("BOOLEAN", {"default": True, "tooltip": "Gate the negative prompt too, as the method "
                                                                      "does. Off: only the positive prompt is gated."}),
            },
        }

    def apply(self, model, maskattn: GateSource, threshold, strength, stage, placement, start_percent, end_percent,
              gate_uncond=True):
        if not isinstance(maskattn, GateSource):
            raise NodeError(
                f"Apply MaskAttn: maskattn is a {type(maskattn).__name__}, not a MaskAttn gate source. Connect 'Load "
                f"MaskAttn Gates', 'Train MaskAttn Gates', 'MaskAttn Zero-Shot Gates' or 'MaskAttn Region Gates' "
                f"(a new kind of gates subclasses masks.source.GateSource).")
        # A gate source may carry its own start (zero-shot gates: skip the steps before layout settles); the later
        # of the two wins. Learned gates start at 0, so for them start_percent is used as given.
        if maskattn.handover_percent is not None and start_percent > 0.0:
            log.warning("Apply MaskAttn: start_percent is %.2f, so the prompt's layout does not act from the first "
                        "step, when the layout is decided; set start_percent to 0 to let it.", start_percent)
        start_percent = max(start_percent, float(maskattn.start_percent))
        if strength <= 0.0 or start_percent >= end_percent:
            return (model.clone(),)
        try:
            all_sites = hooks.model_sites(model)
            maskattn.check_fits(all_sites)
        except (UnsupportedModelError, GateMismatchError) as e:
            raise NodeError(f"Apply MaskAttn: {e}") from None
        sites = [s for s in select_sites(all_sites, stage, placement) if maskattn.covers(s.key)]
        if not sites:
            covered = sum(maskattn.covers(s.key) for s in all_sites)
            raise NodeError(
                f"Apply MaskAttn: the gates {maskattn.source or ''} cover stage '{maskattn.stage}' ({covered} layers "
                f"of this model), none of which pass stage='{stage}', placement='{placement}'. "
                f"Set stage to 'all' or to '{maskattn.stage}'."
            )
        sampling = model.model.model_sampling
        patched, _ = hooks.install(
            model, maskattn, sites, threshold=threshold,
            negative_value=strength_to_negative_value(strength, maskattn.negative_value),
            sigma_start=None if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent)),
            sigma_end=None if end_percent >= 1.0 else float(sampling.percent_to_sigma(end_percent)),
            cond_only=not gate_uncond,
        )
        if maskattn.handover_percent is not None:
            options = patched.model_options.setdefault("transformer_options", {})
            options[HANDOVER_SIGMA] = float(sampling.percent_to_sigma(maskattn.handover_percent))
        return (patched,)


class MaskAttnSaveGates:
    DESCRIPTION = "Saves MaskAttn gates as .safetensors into models/maskattn (never overwrites: a counter is added)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"maskattn": ("MASKATTN",), "filename_prefix": ("STRING", {
            "default": "maskattn_gates", "tooltip": "File name before the counter; may name a sub-folder of "
                                                    "models/maskattn."})}}

    def save(self, maskattn: MaskAttnGates, filename_prefix):
        if not isinstance(maskattn, MaskAttnGates):
            raise NodeError(f"Save MaskAttn Gates: {kind_of(maskattn)} gates are "
                            f"computed from the prompt at sampling time and have no weights to save; connect learned "
                            f"gates (Load or Train MaskAttn Gates).")
        root = os.path.abspath(paths.save_dir())
        prefix = os.path.normpath(filename_prefix.strip() or "maskattn_gates")
        folder = os.path.abspath(os.path.join(root, os.path.dirname(prefix)))
        if os.path.isabs(prefix) or os.path.commonpath((root, folder)) != root:
            raise NodeError(f"Save MaskAttn Gates: filename_prefix {filename_prefix!r} points outside {root}; use a "
                            f"name (or sub/folder/name) inside it.")
        os.makedirs(folder, exist_ok=True)
        stem = os.path.basename(prefix)
        taken = [int(m.group(1)) for f in os.listdir(folder)
                 if (m := re.fullmatch(re.escape(stem) + r"_(\d+)\.safetensors", f))]
        path = os.path.join(folder, f"{stem}_{max(taken, default=0) + 1:05}.safetensors")
        save_gates(maskattn, path)
        return {"ui": {"text": [os.path.relpath(path, root)]}, "result": ()}


NODE_CLASS_MAPPINGS = {
    "MaskAttnLoadGates": MaskAttnLoadGates,
    "MaskAttnApply": MaskAttnApply,
    "MaskAttnSaveGates": MaskAttnSaveGates,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MaskAttnLoadGates": "Load MaskAttn Gates",
    "MaskAttnApply": "Apply MaskAttn",
    "MaskAttnSaveGates": "Save MaskAttn Gates",
}
