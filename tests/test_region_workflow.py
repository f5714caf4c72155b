"""The Region Gates example workflow (UI format + API twin): written by this file, runnable on stock ComfyUI.

    python tests/test_region_workflow.py      # rewrite workflows/maskattn_sdxl_region*.json

The masks come from stock nodes only (SolidMask + MaskComposite make the left and right halves of the image), so
the workflow needs nothing but an SDXL checkpoint. The tests run the mask part of the graph with the host's own nodes
and feed the result to the Region Gates node.
"""

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import workflow_build  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NAME = "maskattn_sdxl_region"
PROMPT = "a photo of a red cube and a blue sphere on a wooden table, studio light"
PHRASES = "red cube\nblue sphere"
SOCKETS = {
    "SolidMask": ([], ["value", "width", "height"], [("MASK", "MASK")]),
    "MaskComposite": ([("destination", "MASK"), ("source", "MASK")], ["x", "y", "operation"], [("MASK", "MASK")]),
    "MaskAttnRegionGates": ([("clip", "CLIP")] + [(f"mask_{i}", "MASK") for i in range(1, 5)],
                            ["text", "phrases", "stage", "end_tokens"],
                            [("maskattn", "MASKATTN"), ("description", "STRING")]),
}


def region_workflow():
    """SDXL txt2img where "red cube" may only appear in the left half and "blue sphere" only in the right half."""
    return NAME, [
        (1, "CheckpointLoaderSimple", [workflow_build.CHECKPOINT], {}, (40, 120)),
        (2, "CLIPTextEncode", [PROMPT], {"clip": (1, 1)}, (400, 440)),
        (3, "CLIPTextEncode", [workflow_build.NEGATIVE], {"clip": (1, 1)}, (400, 660)),
        (4, "SolidMask", [0.0, 1024, 1024], {}, (40, 420)),  # the empty canvas
        (5, "SolidMask", [1.0, 512, 1024], {}, (40, 560)),  # a half-width rectangle
        (6, "MaskComposite", [0, 0, "add"], {"destination": (4, 0), "source": (5, 0)}, (40, 700)),  # left half
        (7, "MaskComposite", [512, 0, "add"], {"destination": (4, 0), "source": (5, 0)}, (40, 880)),  # right half
        (8, "MaskAttnRegionGates", [PROMPT, PHRASES, "all", "keep"],
         {"clip": (1, 1), "mask_1": (6, 0), "mask_2": (7, 0)}, (400, 120)),
        (9, "MaskAttnApply", workflow_build.APPLY, {"model": (1, 0), "maskattn": (8, 0)}, (760, 120)),
        (10, "EmptyLatentImage", [1024, 1024, 1], {}, (760, 660)),
        (11, "KSampler", [workflow_build.SEED, "fixed", 25, 7.0, "euler", "normal", 1.0],
         {"model": (9, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (10, 0)}, (1100, 120)),
        (12, "VAEDecode", [], {"samples": (11, 0), "vae": (1, 2)}, (1460, 120)),
        (13, "SaveImage", ["MaskAttn_region"], {"images": (12, 0)}, (1460, 260)),
    ]


def build() -> dict[str, dict]:
    workflow_build.SOCKETS.update({k: v for k, v in SOCKETS.items() if k not in workflow_build.SOCKETS})
    name, nodes = region_workflow()
    return {f"{name}.json": workflow_build.ui_format(name, nodes), f"{name}_api.json": workflow_build.api_format(nodes)}


def test_files_are_what_this_file_writes():
    for filename, data in build().items():
        assert (REPO / "workflows" / filename).read_text() == workflow_build.dumps(data), (
            f"workflows/{filename} is stale: run `python tests/test_region_workflow.py`")


def stock_and_pack_nodes() -> dict:
    import nodes as comfy_nodes
    from comfy_extras import nodes_mask  # SolidMask, MaskComposite: stock, loaded by ComfyUI at start

    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS as pack

    return {**comfy_nodes.NODE_CLASS_MAPPINGS, **nodes_mask.NODE_CLASS_MAPPINGS, **pack}


def test_sockets_match_the_nodes(host):
    known = stock_and_pack_nodes()
    for cls, (sockets, widgets, outputs) in SOCKETS.items():
        spec = known[cls].INPUT_TYPES()
        inputs = {**spec["required"], **spec.get("optional", {})}
        assert [n for n in inputs if n not in widgets] == [n for n, _ in sockets], cls
        assert [n for n in inputs if n in widgets] == widgets, cls
        assert list(known[cls].RETURN_TYPES) == [t for _, t in outputs], cls


def test_ui_and_api_agree_and_the_mask_graph_runs_on_stock_nodes(host):
    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS as pack

    ui = json.loads((REPO / "workflows" / f"{NAME}.json").read_text())
    api = json.loads((REPO / "workflows" / f"{NAME}_api.json").read_text())
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    known = stock_and_pack_nodes()
    for node_id, node in api.items():
        cls = known[node["class_type"]]
        spec = cls.INPUT_TYPES()
        for required in spec["required"]:
            assert required in node["inputs"], (node_id, required)
        for key, value in node["inputs"].items():
            kind = {**spec["required"], **spec.get("optional", {})}[key][0]
            if isinstance(kind, list) and key != "ckpt_name":
                assert value in kind, (node_id, key, value)
    # run the mask nodes as the executor would, then the Region Gates node on SDXL's tokenizer
    outputs = {}
    for node_id in ("4", "5", "6", "7"):
        node = api[node_id]
        cls = known[node["class_type"]]
        args = {k: outputs[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        outputs[node_id] = getattr(cls(), cls.FUNCTION)(**args)
    left, right = outputs["6"][0], outputs["7"][0]
    assert left.shape == right.shape == (1, 1024, 1024)
    assert left[0, :, :512].min() == 1 and left[0, :, 512:].max() == 0 and right[0, :, 512:].min() == 1
    assert right[0, :, :512].max() == 0

    from comfy.sdxl_clip import SDXLTokenizer

    class Clip:
        tokenizer = SDXLTokenizer()

        def tokenize(self, text, return_word_ids=False):
            return self.tokenizer.tokenize_with_weights(text, return_word_ids)

    region = api["8"]["inputs"]
    out = pack["MaskAttnRegionGates"]().build(Clip(), region["text"], region["phrases"], region["stage"],
                                              region["end_tokens"], mask_1=left, mask_2=right)
    gates, description = out["result"]
    assert gates.phrases == ["red cube", "blue sphere"] and "50% of the image" in description
    assert api["2"]["inputs"]["text"] == region["text"]  # the gated prompt is the encoded one


if __name__ == "__main__":
    for filename, data in build().items():
        (REPO / "workflows" / filename).write_text(workflow_build.dumps(data))
        print("wrote", REPO / "workflows" / filename)
