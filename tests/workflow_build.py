"""Writes the example workflows in workflows/ from one entry each in TEMPLATES: the UI workflow, its thumbnail and
its API-format twin.

    python tests/workflow_build.py          # rewrite workflows/*.json, workflows/*.jpg, workflows/api/*_api.json
    (tests/test_preview_workflows.py checks the files are what this script writes, and that both formats agree)

ComfyUI's Templates browser lists every `*.json` at the top of a pack's `workflows/` folder (ComfyUI 0.3.64,
app/custom_node_manager.py) with the `.jpg` of the same name beside it as the thumbnail; the frontend takes no title
or description from a pack (it shows the file name), so each card draws its own (tests/template_cards.py). The API
twins live in workflows/api/, where the browser does not look. Adding a workflow is one more Template in TEMPLATES.

A node is (id, class_type, widgets in the frontend's widget order, {input: (source id, output slot)}, position),
optionally followed by a dict of extra UI fields ({"mode": 4} = bypassed). Bypassed nodes and frontend-only nodes
(Note) have no API-format entry; a link through a bypassed node goes to its input of the same type, as the frontend
sends it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import template_cards  # noqa: E402

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
API_FOLDER = "api"  # the API-format twins: below the top of workflows/, so the Templates browser does not list them

# Sockets (name, type) and widget names per class, in the order ComfyUI's INPUT_TYPES lists them. Widgets that the
# frontend adds itself (KSampler's control_after_generate) are named too, since they sit in widgets_values.
SOCKETS = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [], [("IMAGE", "IMAGE")]),
    "MaskAttnLoadGates": ([("maskattn", "MASKATTN")], ["gate_name"], [("maskattn", "MASKATTN")]),
    "MaskAttnZeroShotGates": ([("clip", "CLIP")], ["text", "stage", "start_percent", "groups", "partition",
                                                   "end_tokens", "self_attention", "layout"],
                              [("maskattn", "MASKATTN"), ("grouping", "STRING"), ("conditioning", "CONDITIONING")]),
    "Note": ([], ["text"], []),
    "MaskAttnApply": ([("model", "MODEL"), ("maskattn", "MASKATTN")],
                      ["threshold", "strength", "stage", "placement", "start_percent", "end_percent", "gate_uncond"],
                      [("MODEL", "MODEL")]),
    "MaskAttnRecordGates": ([("model", "MODEL")], ["layers", "steps", "record_uncond", "max_side", "cap_mb"],
                            [("MODEL", "MODEL")]),
    "MaskAttnPreviewGates": ([("model", "MODEL"), ("image", "IMAGE"), ("latent", "LATENT"),
                              ("conditioning", "CONDITIONING"), ("clip", "CLIP")],
                             ["layers", "step", "rows", "tokens", "show", "opacity", "batch_index", "text"],
                             [("grid", "IMAGE"), ("masks", "MASK")]),
    "SolidMask": ([], ["value", "width", "height"], [("MASK", "MASK")]),
    "MaskComposite": ([("destination", "MASK"), ("source", "MASK")], ["x", "y", "operation"], [("MASK", "MASK")]),
    "MaskAttnRegionGates": ([("clip", "CLIP")] + [(f"mask_{i}", "MASK") for i in range(1, 5)],
                            ["text", "phrases", "stage", "end_tokens"],
                            [("maskattn", "MASKATTN"), ("description", "STRING")]),
    "MaskAttnLayoutFromPrompt": ([("clip", "CLIP")], ["text", "width", "height", "groups"],
                                 [(f"mask_{i}", "MASK") for i in range(1, 5)] + [("phrases", "STRING"),
                                                                                 ("summary", "STRING")]),
}
FRONTEND_ONLY_WIDGETS = {"control_after_generate"}
FRONTEND_ONLY_NODES = {"Note"}
BYPASSED = 4  # LiteGraph node mode

CHECKPOINT = "sd_xl_base_1.0.safetensors"
# Model metadata the frontend's missing-model dialog reads from a loader node's properties.models (name, url,
# directory; tests/test_workflow_templates.py restates the frontend's schema): the official SDXL base 1.0 release.
MODELS = {
    CHECKPOINT: {
        "name": CHECKPOINT,
        "url": f"https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/{CHECKPOINT}",
        "directory": "checkpoints",
    },
}
GATES = "maskattn_gates_00001.safetensors"  # the first file Save MaskAttn Gates writes
PROMPT = "a photo of a red cube on top of a blue sphere, a yellow cat beside them, studio light"
NEGATIVE = "blurry, low quality, watermark"
SEED = 42
APPLY = [0.5, 1.0, "all", "encoder_decoder", 0.0, 1.0, True]  # the method: threshold 0.5, full strength


ZERO_SHOT = [PROMPT, "mid", 0.2, "", "aggregate", "keep", "open", "from the prompt"]
SWITCH_NOTE = (
    "Gates: training-free 'MaskAttn Zero-Shot Gates' (no file needed, any SDXL checkpoint). They feed Apply MaskAttn "
    "through the bypassed (purple) 'Load MaskAttn Gates'.\n\nLearned gates: select 'Load MaskAttn Gates', press "
    "Ctrl+B to un-bypass it and pick your gate file. No trained gates are published: train them with 'Train MaskAttn "
    "Gates' + 'Save MaskAttn Gates', or `python -m cli.train` (README, Training)."
)


def _gate_nodes(x, y):
    """The gate source: zero-shot gates through a bypassed learned-gate loader (un-bypass it to switch)."""
    return [
        (2, "MaskAttnZeroShotGates", ZERO_SHOT, {"clip": (1, 1)}, (x, y)),
        (3, "MaskAttnLoadGates", [GATES], {"maskattn": (2, 0)}, (x + 380, y), {"mode": BYPASSED}),
        (15, "Note", [SWITCH_NOTE], {}, (x + 380, y + 120)),
    ]


def viewer_workflow():
    """(a) SDXL txt2img with zero-shot gates, Apply MaskAttn, recording, and the gate viewer."""
    return "maskattn_sdxl_viewer", [
        (1, "CheckpointLoaderSimple", [CHECKPOINT], {}, (40, 120)),
        *_gate_nodes(40, 330),
        (4, "MaskAttnApply", APPLY, {"model": (1, 0), "maskattn": (3, 0)}, (800, 120)),
        (5, "MaskAttnRecordGates", ["all", "all", False, 32, 64], {"model": (4, 0)}, (1160, 120)),
        (6, "CLIPTextEncode", [NEGATIVE], {"clip": (1, 1)}, (800, 660)),
        (7, "EmptyLatentImage", [1024, 1024, 1], {}, (1160, 660)),
        (8, "KSampler", [SEED, "fixed", 25, 7.0, "euler", "normal", 1.0],
         {"model": (5, 0), "positive": (2, 2), "negative": (6, 0), "latent_image": (7, 0)}, (1500, 120)),
        (9, "VAEDecode", [], {"samples": (8, 0), "vae": (1, 2)}, (1860, 120)),
        (10, "SaveImage", ["MaskAttn"], {"images": (9, 0)}, (1860, 260)),
        (11, "MaskAttnPreviewGates", ["mean", "mean", "layers", "", "gate", 0.6, 0, ""],
         {"model": (5, 0), "image": (9, 0), "conditioning": (2, 2)}, (2200, 120)),
    ]


def compare_workflow():
    """(b) the same seed with and without MaskAttn (zero-shot gates), side by side in one image batch."""
    return "maskattn_sdxl_compare", [
        (1, "CheckpointLoaderSimple", [CHECKPOINT], {}, (40, 120)),
        *_gate_nodes(40, 330),
        (4, "MaskAttnApply", APPLY, {"model": (1, 0), "maskattn": (3, 0)}, (800, 120)),
        (6, "CLIPTextEncode", [NEGATIVE], {"clip": (1, 1)}, (800, 660)),
        (7, "EmptyLatentImage", [1024, 1024, 1], {}, (1160, 660)),
        (8, "KSampler", [SEED, "fixed", 25, 7.0, "euler", "normal", 1.0],
         {"model": (1, 0), "positive": (2, 2), "negative": (6, 0), "latent_image": (7, 0)}, (1500, 40)),
        (9, "KSampler", [SEED, "fixed", 25, 7.0, "euler", "normal", 1.0],
         {"model": (4, 0), "positive": (2, 2), "negative": (6, 0), "latent_image": (7, 0)}, (1500, 400)),
        (10, "VAEDecode", [], {"samples": (8, 0), "vae": (1, 2)}, (1860, 40)),
        (11, "VAEDecode", [], {"samples": (9, 0), "vae": (1, 2)}, (1860, 400)),
        (12, "ImageBatch", [], {"image1": (10, 0), "image2": (11, 0)}, (2120, 200)),
        (13, "SaveImage", ["MaskAttn_without_vs_with"], {"images": (12, 0)}, (2360, 200)),
    ]


REGION_PROMPT = "a photo of a red cube and a blue sphere on a wooden table, studio light"
REGION_PHRASES = "red cube\nblue sphere"


def region_workflow():
    """SDXL txt2img where "red cube" may only appear in the left half and "blue sphere" only in the right half. The
    masks come from stock nodes only (SolidMask + MaskComposite make the two halves)."""
    return "maskattn_sdxl_region", [
        (1, "CheckpointLoaderSimple", [CHECKPOINT], {}, (40, 120)),
        (2, "CLIPTextEncode", [REGION_PROMPT], {"clip": (1, 1)}, (400, 440)),
        (3, "CLIPTextEncode", [NEGATIVE], {"clip": (1, 1)}, (400, 660)),
        (4, "SolidMask", [0.0, 1024, 1024], {}, (40, 420)),  # the empty canvas
        (5, "SolidMask", [1.0, 512, 1024], {}, (40, 560)),  # a half-width rectangle
        (6, "MaskComposite", [0, 0, "add"], {"destination": (4, 0), "source": (5, 0)}, (40, 700)),  # left half
        (7, "MaskComposite", [512, 0, "add"], {"destination": (4, 0), "source": (5, 0)}, (40, 880)),  # right half
        (8, "MaskAttnRegionGates", [REGION_PROMPT, REGION_PHRASES, "all", "keep"],
         {"clip": (1, 1), "mask_1": (6, 0), "mask_2": (7, 0)}, (400, 120)),
        (9, "MaskAttnApply", APPLY, {"model": (1, 0), "maskattn": (8, 0)}, (760, 120)),
        (10, "EmptyLatentImage", [1024, 1024, 1], {}, (760, 660)),
        (11, "KSampler", [SEED, "fixed", 25, 7.0, "euler", "normal", 1.0],
         {"model": (9, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (10, 0)}, (1100, 120)),
        (12, "VAEDecode", [], {"samples": (11, 0), "vae": (1, 2)}, (1460, 120)),
        (13, "SaveImage", ["MaskAttn_region"], {"images": (12, 0)}, (1460, 260)),
    ]


LAYOUT_PROMPT = "a photo of a red cube to the left of a blue sphere on a wooden table, studio light"
LAYOUT_NOTE = (
    "MaskAttn Layout from Prompt reads where the prompt puts each object ('to the left of', 'on top of', 'beside', "
    "'between', 'in the bottom right corner', ...) and gives one mask per object, and their phrases, to Region "
    "Gates. Change the prompt in all three text boxes (Layout from Prompt, Region Gates, CLIP Text Encode); the "
    "summary output says what it placed where."
)


def layout_workflow():
    """SDXL txt2img whose layout comes from the prompt's own words: Layout from Prompt's masks and phrases feed
    Region Gates."""
    return "maskattn_sdxl_layout", [
        (1, "CheckpointLoaderSimple", [CHECKPOINT], {}, (40, 120)),
        (2, "CLIPTextEncode", [LAYOUT_PROMPT], {"clip": (1, 1)}, (760, 440)),
        (3, "CLIPTextEncode", [NEGATIVE], {"clip": (1, 1)}, (760, 660)),
        (4, "MaskAttnLayoutFromPrompt", [LAYOUT_PROMPT, 1024, 1024, ""], {"clip": (1, 1)}, (40, 420)),
        (5, "MaskAttnRegionGates", [LAYOUT_PROMPT, "red cube\nblue sphere", "all", "keep"],
         {"clip": (1, 1), **{f"mask_{i + 1}": (4, i) for i in range(4)}, "phrases": (4, 4)}, (400, 120)),
        (6, "MaskAttnApply", APPLY, {"model": (1, 0), "maskattn": (5, 0)}, (760, 120)),
        (7, "EmptyLatentImage", [1024, 1024, 1], {}, (1100, 660)),
        (8, "KSampler", [SEED, "fixed", 25, 7.0, "euler", "normal", 1.0],
         {"model": (6, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (7, 0)}, (1100, 120)),
        (9, "VAEDecode", [], {"samples": (8, 0), "vae": (1, 2)}, (1460, 120)),
        (10, "SaveImage", ["MaskAttn_layout"], {"images": (9, 0)}, (1460, 260)),
        (11, "Note", [LAYOUT_NOTE], {}, (40, 760)),
    ]


@dataclass(frozen=True)
class Template:
    """One example workflow as the Templates browser shows it: the graph, and the card's title, one-line description
    and picture (a template_cards painter: (width, height) -> RGB image)."""

    graph: Callable[[], tuple[str, list]]
    title: str
    description: str
    picture: Callable


TEMPLATES = [
    Template(viewer_workflow, "MaskAttn gate viewer (SDXL)",
             "Zero-shot gates on SDXL; see each word's gate per layer and step on the canvas.",
             template_cards.viewer_picture),
    Template(compare_workflow, "MaskAttn off and on (SDXL)",
             "One seed sampled without and with MaskAttn, side by side in one image.",
             template_cards.compare_picture),
    Template(region_workflow, "MaskAttn region gates (SDXL)",
             "Each phrase in its own part of the image: 'red cube' left, 'blue sphere' right.",
             template_cards.region_picture),
    Template(layout_workflow, "MaskAttn prompt layout (SDXL)",
             "'to the left of', 'on top of', 'between': the prompt's own words place each object.",
             template_cards.layout_picture),
]

TITLES = {(("maskattn_sdxl_compare", 8)): "KSampler (without MaskAttn)",
          (("maskattn_sdxl_compare", 9)): "KSampler (with MaskAttn)"}


def _extra(node) -> dict:
    return node[5] if len(node) > 5 else {}


def api_format(nodes) -> dict:
    """What the frontend queues: no bypassed or frontend-only nodes; links through a bypassed node go to its input
    of the same type."""
    by_id = {n[0]: n for n in nodes}

    def source(src, slot):
        while _extra(by_id[src]).get("mode") == BYPASSED:
            kind = SOCKETS[by_id[src][1]][2][slot][1]
            name = next(n for n, t in SOCKETS[by_id[src][1]][0] if t == kind)
            src, slot = by_id[src][3][name]
        return [str(src), slot]

    prompt = {}
    for node in nodes:
        node_id, cls, widgets, links = node[:4]
        if cls in FRONTEND_ONLY_NODES or _extra(node).get("mode") == BYPASSED:
            continue
        sockets, widget_names, _ = SOCKETS[cls]
        inputs = {}
        names = [w for w in widget_names if w not in FRONTEND_ONLY_WIDGETS]
        values = [v for w, v in zip(widget_names, widgets) if w not in FRONTEND_ONLY_WIDGETS]
        assert len(widget_names) == len(widgets), (cls, widgets)
        inputs.update(zip(names, values))
        for name, (src, slot) in links.items():
            inputs[name] = source(src, slot)
        prompt[str(node_id)] = {"inputs": inputs, "class_type": cls}
    return prompt


def _widget_inputs(cls, node_links) -> list[str]:
    """Widgets fed by a link (the frontend's converted widgets), in widget order: inputs after the sockets."""
    sockets = [s for s, _ in SOCKETS[cls][0]]
    return [w for w in SOCKETS[cls][1] if w in node_links and w not in sockets]


def ui_format(name, nodes) -> dict:
    links, out_links = [], {}
    for node_id, cls, _, node_links, *_ in nodes:
        sockets = [s for s, _ in SOCKETS[cls][0]] + _widget_inputs(cls, node_links)
        for input_name, (src, slot) in node_links.items():
            link_id = len(links) + 1
            src_cls = next(n[1] for n in nodes if n[0] == src)
            links.append([link_id, src, slot, node_id, sockets.index(input_name), SOCKETS[src_cls][2][slot][1]])
            out_links.setdefault((src, slot), []).append(link_id)
    in_links = {(lk[3], lk[4]): lk[0] for lk in links}
    ui_nodes = []
    for order, (node_id, cls, widgets, node_links, pos, *extra) in enumerate(nodes):
        sockets, _, outputs = SOCKETS[cls]
        converted = [(w, next(SOCKETS[n[1]][2][node_links[w][1]][1] for n in nodes if n[0] == node_links[w][0]))
                     for w in _widget_inputs(cls, node_links)]
        node = {
            "id": node_id, "type": cls, "pos": list(pos), "size": [320, 100 + 26 * len(widgets)], "flags": {},
            "order": order, "mode": (extra[0] if extra else {}).get("mode", 0),
            "inputs": [{"name": n, "type": t, "link": in_links.get((node_id, i))} for i, (n, t) in enumerate(sockets)]
            + [{"name": n, "type": t, "widget": {"name": n}, "link": in_links.get((node_id, len(sockets) + i))}
               for i, (n, t) in enumerate(converted)],
            "outputs": [{"name": n, "type": t, "links": out_links.get((node_id, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": cls},
            "widgets_values": list(widgets),
        }
        models = [MODELS[v] for v in widgets if isinstance(v, str) and v in MODELS]
        if models:
            node["properties"]["models"] = models
        if (name, node_id) in TITLES:
            node["title"] = TITLES[(name, node_id)]
        if cls == "MaskAttnPreviewGates":
            node["size"] = [520, 760]
        elif cls == "MaskAttnZeroShotGates":
            node["size"] = [340, 420]
        elif cls == "Note":
            node["size"] = [340, 200]
            node["properties"] = {"text": ""}
            node["color"], node["bgcolor"] = "#432", "#653"
        ui_nodes.append(node)
    return {"last_node_id": max(n[0] for n in nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def api_name(name: str) -> str:
    """Where a workflow's API-format twin lives, relative to workflows/."""
    return f"{API_FOLDER}/{name}_api.json"


def build() -> dict[str, dict]:
    """Every file TEMPLATES describes, by path relative to workflows/ (the thumbnails come from cards())."""
    files = {}
    for template in TEMPLATES:
        name, nodes = template.graph()
        files[f"{name}.json"] = ui_format(name, nodes)
        files[api_name(name)] = api_format(nodes)
    return files


def cards() -> dict[str, object]:
    """Each UI workflow's thumbnail (a PIL image), by path relative to workflows/."""
    return {f"{t.graph()[0]}.jpg": template_cards.card(t.title, t.description, t.picture) for t in TEMPLATES}


def dumps(data) -> str:
    return json.dumps(data, indent=2) + "\n"


def write() -> None:
    (WORKFLOWS / API_FOLDER).mkdir(parents=True, exist_ok=True)
    for filename, data in build().items():
        (WORKFLOWS / filename).write_text(dumps(data))
        print("wrote", WORKFLOWS / filename)
    for filename, image in cards().items():
        template_cards.save(image, WORKFLOWS / filename)
        print("wrote", WORKFLOWS / filename)
    template_cards.icon().save(template_cards.ICON, optimize=True)
    print("wrote", template_cards.ICON)


if __name__ == "__main__":
    write()
