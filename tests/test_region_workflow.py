"""The Region Gates example workflow (UI format + API twin, written by tests/workflow_build.py): runnable on stock
ComfyUI.

The masks come from stock nodes only (SolidMask + MaskComposite make the left and right halves of the image), so
the workflow needs nothing but an SDXL checkpoint. The tests run the mask part of the graph with the host's own nodes
and feed the result to the Region Gates node.
"""

import json
from pathlib import Path

import workflow_build

REPO = Path(__file__).resolve().parent.parent
NAME = workflow_build.region_workflow()[0]
REGION_CLASSES = ("SolidMask", "MaskComposite", "MaskAttnRegionGates")


def stock_and_pack_nodes() -> dict:
    import nodes as comfy_nodes
    from comfy_extras import nodes_mask  # SolidMask, MaskComposite: stock, loaded by ComfyUI at start

    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS as pack

    return {**comfy_nodes.NODE_CLASS_MAPPINGS, **nodes_mask.NODE_CLASS_MAPPINGS, **pack}


def test_sockets_match_the_nodes(host):
    known = stock_and_pack_nodes()
    for cls in REGION_CLASSES:
        sockets, widgets, outputs = workflow_build.SOCKETS[cls]
        spec = known[cls].INPUT_TYPES()
        inputs = {**spec["required"], **spec.get("optional", {})}
        assert [n for n in inputs if n not in widgets] == [n for n, _ in sockets], cls
        assert [n for n in inputs if n in widgets] == widgets, cls
        assert list(known[cls].RETURN_TYPES) == [t for _, t in outputs], cls


def test_ui_and_api_agree_and_the_mask_graph_runs_on_stock_nodes(host):
    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS as pack

    ui = json.loads((REPO / "workflows" / f"{NAME}.json").read_text())
    api = json.loads((REPO / "workflows" / workflow_build.api_name(NAME)).read_text())
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

