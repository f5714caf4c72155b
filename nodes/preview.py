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
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import uuid

import numpy as np
import torch
import torch.nn.functional as F

from ..masks.record import DEFAULT_CAP_BYTES, DEFAULT_MAX_SIDE, GateRecorder, RunRecord, site_map
from ..masks.topology import STAGES
from . import hooks
from .gates import NodeError

log = logging.getLogger("MaskAttn")
CATEGORY = "MaskAttn"
RECORDER_KEY = "maskattn_recorder"  # transformer_options entry; ComfyUI hands it to every hook as extra_options[...]
VIEWER_KEY = "maskattn_viewer"  # `ui` entry: [{"filename", "subfolder", "type"}] of the viewer's data, or [{"message"}]
MAX_COLUMNS = 24
VIEWER_BUDGET = 4 * 1024 * 1024  # bytes of maps sent to the browser per kind


# --- recording -----------------------------------------------------------------------------------------------------
def dispatch_to_recorder(key, result, info):
    """GateRuntime observer: hands the call to the recorder of the model being sampled, if it has one."""
    recorder = info.get(RECORDER_KEY) if info else None
    if recorder is not None:
        recorder(key, result, info)


def model_recorder(model) -> GateRecorder | None:
    return model.model_options.get("transformer_options", {}).get(RECORDER_KEY)


def select_layers(spec: str, sites, node: str) -> tuple[list, bool]:
    """Parse a layer choice into (sites, mean). spec: "all", "mean", a stage ("high"/"mid"/"low"), "mean:<stage>",
    or a comma list of layer names ("input.7.0, output.1.1"; "input.7" takes every layer of that block)."""
    text = (spec or "all").strip().lower()
    mean = False
    if text == "mean":
        text, mean = "all", True
    elif text.startswith("mean:"):
        text, mean = text[5:].strip() or "all", True
    if text == "all":
        return list(sites), mean
    if text in STAGES:
        chosen = [s for s in sites if s.stage == text]
        if not chosen:
            raise NodeError(f"{node}: layers '{spec}': no recorded layer is in stage '{text}' (recorded stages: "
                            f"{', '.join(sorted({s.stage for s in sites})) or 'none'}). Use 'all' or another stage.")
        return chosen, mean
    chosen = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        found = [s for s in sites if s.name == part or s.name.startswith(part + ".")]
        if not found:
            names = ", ".join(s.name for s in sites[:12]) + (" …" if len(sites) > 12 else "")
            raise NodeError(f"{node}: layers '{spec}': there is no layer '{part}' among {names or 'none'}. Use a "
                            f"name like 'input.7.0', a stage (high, mid, low), 'all' or 'mean'.")
        chosen += [s for s in found if s not in chosen]
    return chosen, mean


def parse_steps(spec: str, node: str) -> set | None:
    text = (spec or "all").strip().lower()
    if text == "all":
        return None
    steps = set()
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise NodeError(f"{node}: steps '{spec}': '{part}' is not a step index or a range. Use 'all' or a list "
                            f"such as '0, 5, 10-19' (0 is the first step).")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        steps.update(range(min(lo, hi), max(lo, hi) + 1))
    return steps


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
        chosen, _ = select_layers(layers, gated, node)
        recorder = GateRecorder({s.key for s in chosen}, parse_steps(steps, node), uncond=record_uncond,
                                max_side=max_side, cap_bytes=int(cap_mb) * 2**20)
        if dispatch_to_recorder not in runtime.observers:  # shared by clones of the patched model; a no-op for
            runtime.observers.append(dispatch_to_recorder)  # any of them that carries no recorder
        recorder.source = gate_source_label(runtime.gates)
        recorded = model.clone()
        recorded.model_options.setdefault("transformer_options", {})[RECORDER_KEY] = recorder
        return (recorded,)


# --- prompt words ----------------------------------------------------------------------------------------------------
_default_tokenizer = None


def _clip_l_tokenizer():
    global _default_tokenizer
    if _default_tokenizer is None:
        import comfy.sd1_clip

        _default_tokenizer = comfy.sd1_clip.SDTokenizer()
    return _default_tokenizer


def _vocab(clip, key):
    sub = getattr(getattr(clip, "tokenizer", None), f"clip_{key}", None) if clip is not None else None
    inv = getattr(sub, "inv_vocab", None)
    return inv if inv else _clip_l_tokenizer().inv_vocab


def prompt_words(text: str, clip=None) -> list[tuple[str, list[int]]]:
    """(word, token positions in the context) for every word of `text`, in order; padding, start and end tokens
    and punctuation are skipped. Positions count across 77-token chunks like ComfyUI's concatenated context."""
    if clip is not None and hasattr(clip, "tokenize"):
        try:
            tokens = clip.tokenize(text, return_word_ids=True)
        except TypeError:
            tokens = None
    else:
        tokens = None
    if not isinstance(tokens, dict) or not tokens:
        tokens = _clip_l_tokenizer().tokenize_with_weights(text, return_word_ids=True)
        tokens = {"l": tokens} if not isinstance(tokens, dict) else tokens
    key = "l" if "l" in tokens else next(iter(tokens))
    inv = _vocab(clip, key)
    # Words end at CLIP's end-of-word marker "</w>" (newer hosts give one word id per prompt segment, not per word).
    out: list[tuple[str, list[int]]] = []
    pieces, positions, last_id = [], [], None

    def close():
        if positions:
            out.append(("".join(pieces).replace("</w>", "").strip() or "?", list(positions)))
        pieces.clear()
        positions.clear()

    position = 0
    for chunk in tokens[key]:
        for item in chunk:
            token, word_id = item[0], (item[2] if len(item) > 2 else 0)
            if not word_id:
                close()
            else:
                if word_id != last_id:
                    close()
                piece = inv.get(token, "?") if isinstance(token, int) else "<embedding></w>"
                pieces.append(piece)
                positions.append(position)
                if piece.endswith("</w>"):
                    close()
            last_id = word_id
            position += 1
    close()
    return [(w, pos) for w, pos in out if any(ch.isalnum() for ch in w) or w == "<embedding>"]  # no punctuation


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


def choose_columns(words, tokens_spec: str, tokens_recorded: int, node: str) -> list[tuple[str, list[int]]]:
    """Columns of the grid: the chosen words (all by default) that lie in the recorded context."""
    if not words:  # no prompt text: the first tokens after the start token
        count = min(8, max(tokens_recorded - 1, 1))
        words = [(f"#{i}", [i]) for i in range(1, count + 1)]
    words = [(w, [p for p in pos if p < tokens_recorded]) for w, pos in words]
    words = [(w, pos) for w, pos in words if pos]
    spec = [t.strip().lower() for t in (tokens_spec or "").split(",") if t.strip()]
    if spec:
        chosen = []
        for want in spec:
            found = [(w, pos) for w, pos in words if w.lower() == want or w.lower().strip(".,;:!?") == want]
            if not found:
                raise NodeError(f"{node}: tokens: '{want}' is not a word of the prompt. Words: "
                                f"{', '.join(w for w, _ in words[:40])}. Leave tokens empty for all of them.")
            chosen += [f for f in found if f not in chosen]
        words = chosen
    seen = {}
    out = []
    for w, pos in words[:MAX_COLUMNS]:
        seen[w] = seen.get(w, 0) + 1
        out.append((w if seen[w] == 1 else f"{w}#{seen[w]}", pos))
    return out


# --- maps ------------------------------------------------------------------------------------------------------------
def _resize(x: torch.Tensor, hw) -> torch.Tensor:
    """[..., h, w] -> [..., H, W] bilinear."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]).float(), size=tuple(hw), mode="bilinear", align_corners=False)
    return y.reshape(*lead, *hw)


def layer_mean(run: RunRecord, keys, step, kind, batch_index, hw):
    maps = [site_map(run, k, step, kind=kind, batch_index=batch_index) for k in keys]
    maps = [_resize(m, hw) for m in maps if m is not None]
    return torch.stack(maps).mean(0) if maps else None


def word_maps(tmap: torch.Tensor, columns) -> torch.Tensor:
    """[T, h, w] -> [K, h, w]: the mean over each word's token positions."""
    return torch.stack([tmap[pos].mean(0) for _, pos in columns])


# --- drawing ---------------------------------------------------------------------------------------------------------
_CMAP_ANCHORS = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                          (250, 193, 39), (252, 255, 164)], dtype=np.float32)  # dark violet -> yellow ("inferno"-like)


def colormap(values: np.ndarray) -> np.ndarray:
    """[..] in 0..1 -> [.., 3] uint8."""
    x = np.clip(values, 0, 1) * (len(_CMAP_ANCHORS) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_CMAP_ANCHORS) - 2)
    t = (x - i)[..., None]
    return (_CMAP_ANCHORS[i] * (1 - t) + _CMAP_ANCHORS[i + 1] * t).astype(np.uint8)


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_grid(tiles, row_labels, col_labels, base: np.ndarray | None, opacity: float, tile_w: int):
    """tiles [R, K, h, w] in 0..1; base [H, W, 3] uint8 or None. Returns (PIL image, titles [[str]])."""
    from PIL import Image, ImageDraw

    R, K, h, w = tiles.shape
    aspect = (base.shape[0] / base.shape[1]) if base is not None else h / w
    tile_h = max(16, round(tile_w * aspect))
    title_h, pad = 28, 4
    font = _font(11)
    grid = Image.new("RGB", (K * (tile_w + pad) + pad, R * (tile_h + title_h + pad) + pad), (24, 24, 28))
    draw = ImageDraw.Draw(grid)
    base_img = Image.fromarray(base).resize((tile_w, tile_h), Image.BILINEAR) if base is not None else None
    base_arr = np.asarray(base_img, dtype=np.float32) if base_img is not None else None
    titles = []
    for r in range(R):
        row = []
        for k in range(K):
            heat = torch.nn.functional.interpolate(tiles[r, k][None, None].float(), size=(tile_h, tile_w),
                                                   mode="bilinear", align_corners=False)[0, 0].numpy()
            rgb = colormap(heat).astype(np.float32)
            if base_arr is not None:
                rgb = base_arr * (1 - opacity) + rgb * opacity
            x0, y0 = pad + k * (tile_w + pad), pad + r * (tile_h + title_h + pad)
            grid.paste(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)), (x0, y0 + title_h))
            title = (col_labels[k], row_labels[r])
            draw.text((x0 + 2, y0 + 1), _fit(title[0], tile_w), fill=(255, 255, 255), font=font)
            draw.text((x0 + 2, y0 + 14), _fit(title[1], tile_w), fill=(170, 170, 180), font=font)
            row.append(f"{title[0]} | {title[1]}")
        titles.append(row)
    return grid, titles


def _fit(text, width):
    limit = max(4, width // 6)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def message_image(message: str, width=512):
    from PIL import Image, ImageDraw

    lines, line = [], ""
    for word in message.split():
        if len(line) + len(word) + 1 > width // 7:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    img = Image.new("RGB", (width, 16 + 16 * len(lines)), (48, 20, 20))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(lines):
        draw.text((8, 8 + 16 * i), text, fill=(255, 220, 200), font=_font(12))
    return img


def _to_image_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


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


def gate_source_label(gates) -> str:
    """How the viewer names the gates, so training-free (zero-shot) ones are not taken for the learned ones."""
    kind = gates.kind
    if kind == "zero-shot":
        return f"{gates.label} zero-shot gates"
    if kind == "region":
        return f"region gates ({gates.source})" if gates.source else "region gates"
    return f"learned gates ({gates.source})" if gates.source else "learned gates"


def save_viewer_data(payload: dict) -> dict:
    """Write the viewer's data where ComfyUI keeps temp images (served by /view); returns its `ui` entry."""
    import folder_paths

    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    name = f"maskattn_viewer_{uuid.uuid4().hex[:12]}.json"
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(payload, f, separators=(",", ":"))
    return {"filename": name, "subfolder": "", "type": "temp"}


STOP_WORDS = frozenset("a an the of and or with on in at to by for from is are this that".split())


def _group_positions(gates, tokens_recorded: int) -> list[tuple[str, list[int]]]:
    """(group name, token positions) of zero-shot gates' groups; [] for other gate sources."""
    token_groups = gates.token_groups if gates is not None else None
    grouping = gates.grouping if gates is not None else None
    if not token_groups or grouping is None:
        return []
    out = []
    for g, words in enumerate(grouping.group_words()):
        positions = [p for p, gg in enumerate(token_groups) if gg == g and p < tokens_recorded]
        if positions:
            out.append((" ".join(words), positions))
    return out


def first_token(columns, groups) -> int:
    """The column the viewer opens on: the first group's first word (zero-shot gates), else the first word that is
    not an article or a preposition."""
    if groups:
        first = set(groups[0][1])
        for k, (_, pos) in enumerate(columns):
            if first.intersection(pos):
                return k
    for k, (word, _) in enumerate(columns):
        if word.split("#")[0].lower() not in STOP_WORDS:
            return k
    return 0


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
        gated = {s.key: s for s in hooks.model_sites(model)}
        recorded = [gated[k] for k in gated if k in run.hw]  # topology order
        if not recorded:
            return self._message(f"{node}: nothing was recorded for this model's layers.", unique_id)
        chosen, mean = select_layers(layers, recorded, node)
        step_arg = self._step(step, run, node)
        kind = "hard" if show == "gate" else "probabilities"
        b = min(int(batch_index), max(run.batch - 1, 0))
        words = prompt_words(text if text and text.strip() else (traced_prompt_text(prompt, unique_id) or ""), clip)
        columns = choose_columns(words, tokens, run.tokens, node)
        base = self._base_image(image, b)
        hw = max((run.hw[s.key] for s in recorded), key=lambda t: t[0] * t[1])

        if rows == "steps":
            row_labels, row_maps = [], []
            for index, bin_ in enumerate(run.bins):
                m = layer_mean(run, [s.key for s in chosen], index, kind, b, hw)
                if m is not None:
                    row_maps.append(word_maps(m, columns))
                    row_labels.append(f"{bin_.label} ({'mean' if len(chosen) > 1 else chosen[0].name})")
        elif mean or len(chosen) == 1:
            m = layer_mean(run, [s.key for s in chosen], step_arg, kind, b, hw)
            row_maps = [word_maps(m, columns)] if m is not None else []
            stage = f" ({layers.split(':', 1)[1].strip()})" if ":" in layers else ""
            row_labels = [chosen[0].name if len(chosen) == 1 else f"mean of {len(chosen)} layers{stage}"]
        else:
            row_maps, row_labels = [], []
            for s in chosen:
                m = site_map(run, s.key, step_arg, kind=kind, batch_index=b)
                if m is not None:
                    row_maps.append(word_maps(_resize(m, hw), columns))
                    row_labels.append(s.name)
        if not row_maps:
            return self._message(f"{node}: the chosen layers/step were not recorded in this run ({run.summary()}). "
                                 f"Pick layers and steps that 'MaskAttn Record Gates' records.", unique_id)
        tiles = torch.stack(row_maps)  # [R, K, h, w]
        tile_w = 160 if len(columns) <= 8 else 112
        grid, titles = render_grid(tiles, row_labels, [c for c, _ in columns], base, float(opacity), tile_w)
        self.titles = titles  # for tests

        out_hw = self._output_size(image, latent, run.latent_size or hw)
        mask_maps = layer_mean(run, [s.key for s in chosen], step_arg, kind, b, hw)
        masks = _resize(word_maps(mask_maps, columns), out_hw) if mask_maps is not None else torch.zeros(1, *out_hw)

        ui_images = [save_temp(grid, "maskattn_grid")]
        base_ui = save_temp(self._pil(base), "maskattn_base") if base is not None else None
        gates = hooks.installed_runtime(model).gates
        payload = self._viewer_payload(run, recorded, columns, b, base_ui, float(opacity), gates)
        summary = run.summary()
        leakage = gates.leakage()
        if leakage:  # zero-shot gates: the share of each word's attention inside its group's region
            payload["leakage"] = [{"word": w, "group": g, "inside": round(share, 4)} for w, g, share in leakage]
            summary += "; attention inside its region: " + ", ".join(f"{w} {100 * share:.0f}%"
                                                                      for w, _, share in leakage)
        if image is None and latent is None:
            summary += ("; connect the sampler's LATENT or the decoded IMAGE here so this node runs after sampling "
                        "(else it may show the previous run)")
        get_recorder = model_recorder(model)
        if get_recorder is not None:
            get_recorder.finish()
        return {"ui": {"images": ui_images, "text": [summary], VIEWER_KEY: [save_viewer_data(payload)]},
                "result": (_to_image_tensor(grid), masks.clamp(0, 1).float())}

    # helpers
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
    def _step(step, run, node):
        text = (step or "mean").strip().lower()
        if text in ("mean", "last"):
            return text
        try:
            index = int(text)
        except ValueError:
            raise NodeError(f"{node}: step '{step}': use mean, last, or a step index (0 = first, -1 = last).") from None
        if not -len(run.bins) <= index < len(run.bins):
            raise NodeError(f"{node}: step {index}: this run kept {len(run.bins)} step bins "
                            f"({', '.join(b.label for b in run.bins[:8])}). Use an index below {len(run.bins)}, or "
                            f"mean / last.")
        return index

    @staticmethod
    def _base_image(image, b):
        if image is None or not isinstance(image, torch.Tensor) or image.ndim != 4:
            return None
        img = image[min(b, image.shape[0] - 1), ..., :3].float().clamp(0, 1)
        return (img.cpu().numpy() * 255).round().astype(np.uint8)

    @staticmethod
    def _pil(arr):
        from PIL import Image

        img = Image.fromarray(arr)
        if max(img.size) > 512:
            scale = 512 / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        return img

    @staticmethod
    def _output_size(image, latent, hw):
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            return int(image.shape[1]), int(image.shape[2])
        if isinstance(latent, dict) and isinstance(latent.get("samples"), torch.Tensor):
            s = latent["samples"]
            return int(s.shape[-2]) * 8, int(s.shape[-1]) * 8
        return hw[0] * 8, hw[1] * 8

    def _message(self, message, unique_id):
        log.info(message)
        img = message_image(message)
        self.titles = []
        ui = {"images": [save_temp(img, "maskattn_msg")], "text": [message], VIEWER_KEY: [{"message": message}]}
        return {"ui": ui,
                "result": (_to_image_tensor(img), torch.zeros(1, 64, 64))}

    @staticmethod
    def _viewer_payload(run, recorded, columns, b, base_ui, opacity, gates=None):
        """Every recorded layer x step bin x column as uint8 maps, base64, for the browser viewer; with zero-shot
        gates also each group's map (the share of locations that keep the group), from which the viewer draws the
        partition."""
        hw = max((run.hw[s.key] for s in recorded), key=lambda t: t[0] * t[1])
        L, S, K = len(recorded), len(run.bins), len(columns)
        while L * S * K * hw[0] * hw[1] > VIEWER_BUDGET and max(hw) > 8:
            hw = (max(1, math.ceil(hw[0] / 2)), max(1, math.ceil(hw[1] / 2)))
        kinds = {}
        for kind in ("hard", "probabilities"):
            data = torch.zeros(L, S, K, *hw, dtype=torch.uint8)
            present = torch.zeros(L, S, dtype=torch.uint8)
            for li, s in enumerate(recorded):
                for si in range(S):
                    m = site_map(run, s.key, si, kind=kind, batch_index=b)
                    if m is None:
                        continue
                    data[li, si] = (_resize(word_maps(m, columns), hw).clamp(0, 1) * 255).round().to(torch.uint8)
                    present[li, si] = 1
            kinds[kind] = data
        groups = _group_positions(gates, run.tokens)
        group_gate = torch.zeros(L, S, len(groups), *hw, dtype=torch.uint8)
        for li, s in enumerate(recorded):
            for si in range(S):
                m = site_map(run, s.key, si, kind="hard", batch_index=b) if groups else None
                if m is not None:
                    maps = torch.stack([m[pos].mean(0) for _, pos in groups])
                    group_gate[li, si] = (_resize(maps, hw).clamp(0, 1) * 255).round().to(torch.uint8)
        return {
            "run": run.run_id,
            "summary": run.summary(),
            "layers": [{"name": s.name, "stage": s.stage, "diffusers": s.diffusers_name} for s in recorded],
            "steps": [{"label": bin_.label, "first": bin_.first, "last": bin_.last,
                       "sigma": [bin_.sigma_max, bin_.sigma_min]} for bin_ in run.bins],
            "tokens": [{"word": w, "positions": pos} for w, pos in columns],
            "h": hw[0], "w": hw[1],
            "present": base64.b64encode(present.numpy().tobytes()).decode("ascii"),
            "gate": base64.b64encode(kinds["hard"].numpy().tobytes()).decode("ascii"),
            "probability": base64.b64encode(kinds["probabilities"].numpy().tobytes()).decode("ascii"),
            "image": base_ui,
            "opacity": opacity,
            "first_token": first_token(columns, groups),
            "groups": [{"name": name, "positions": pos} for name, pos in groups],
            "group_gate": base64.b64encode(group_gate.numpy().tobytes()).decode("ascii"),
        }


NODE_CLASS_MAPPINGS = {
    "MaskAttnRecordGates": MaskAttnRecordGates,
    "MaskAttnPreviewGates": MaskAttnPreviewGates,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MaskAttnRecordGates": "MaskAttn Record Gates",
    "MaskAttnPreviewGates": "MaskAttn Preview Gates",
}
