"""The example workflows as ComfyUI's Templates browser and the frontend's missing-model dialog read them (pure).

What the server and the frontend do is restated here, from:
- ComfyUI 0.3.64, app/custom_node_manager.py: GET /workflow_templates lists `<pack>/<folder>/*.json` (no subfolders)
  for the folder names below, and serves each folder at /api/workflow_templates/<pack>/.
- comfyui-frontend-package 1.58.1 (Comfy-Org/ComfyUI_frontend,
  src/platform/workflow/templates/repositories/workflowTemplatesStore.ts and useTemplateWorkflows.ts): a pack's
  template is its file name (title and description both derive from it), its thumbnail
  `/api/workflow_templates/<pack>/<name>.jpg` (mediaSubtype "jpg").
- The same frontend's model metadata: src/platform/workflow/validation/schemas/workflowSchema.ts (zModelFile, and
  zProperties.models on a node), src/platform/missingModel/missingModelScan.ts (getSelectedModelsMetadata: a node's
  entries whose name is one of its widget values, on nodes that are neither muted nor bypassed) and
  missingModelDownload.ts (isModelDownloadable: the URL starts with an allowed source and the name ends with a model
  file suffix).
"""

import json
import textwrap
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image, ImageChops, ImageFilter

import template_cards
import workflow_build

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"

TEMPLATE_FOLDERS = ["example_workflows", "example", "examples", "workflow", "workflows"]  # custom_node_manager.py
MODEL_FILE_REQUIRED = {"name": str, "url": str, "directory": str}  # zModelFile
MODEL_FILE_OPTIONAL = {"hash": str, "hash_type": str}
ALLOWED_SOURCES = ("https://civitai.com/", "https://civitai.red/", "https://huggingface.co/")
ALLOWED_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pth", ".pt")
MUTED, BYPASSED = 2, 4  # LiteGraph node modes the scan skips

SDXL_BASE = {
    "name": "sd_xl_base_1.0.safetensors",
    "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "directory": "checkpoints",
}


def template_names() -> list[str]:
    return [t.graph()[0] for t in workflow_build.TEMPLATES]


def listed_templates(pack: Path) -> list[str]:
    """What GET /workflow_templates answers for this pack."""
    return sorted(p.stem for folder in TEMPLATE_FOLDERS for p in (pack / folder).glob("*.json"))


def test_the_templates_browser_lists_exactly_the_ui_workflows():
    listed = listed_templates(REPO)
    assert listed == sorted(template_names())
    assert not [name for name in listed if name.endswith("_api")], listed
    for name in template_names():  # the API twin still ships, where the browser does not look
        assert (WORKFLOWS / workflow_build.api_name(name)).is_file(), name
        assert "nodes" in json.loads((WORKFLOWS / f"{name}.json").read_text()), f"{name}.json is not a UI workflow"


def test_each_template_has_its_card_as_a_jpeg_thumbnail_beside_it():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.jpg")) == sorted(template_names())
    cards = workflow_build.cards()
    for name in template_names():
        path = WORKFLOWS / f"{name}.jpg"
        assert path.stat().st_size <= template_cards.MAX_BYTES, (name, path.stat().st_size)
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == template_cards.SIZE, (name, image.format, image.size)
            # the card as the builder draws it now: JPEG moves a lightly blurred pixel by a few levels, one changed
            # letter of the title or description by far more
            blur = ImageFilter.BoxBlur(1)
            drawn = cards[f"{name}.jpg"].convert("L").filter(blur)
            diff = ImageChops.difference(image.convert("L").filter(blur), drawn)
        assert diff.getextrema()[1] < 24, f"workflows/{name}.jpg is stale: run `python tests/workflow_build.py`"


def test_titles_and_descriptions_fit_their_card():
    font = template_cards._font(30)
    for template in workflow_build.TEMPLATES:
        assert template.title and "\n" not in template.title
        assert font.getlength(template.title) <= template_cards.SIZE[0] - 40, template.title
        assert template.description.endswith(".") and "\n" not in template.description
        assert len(textwrap.wrap(template.description, width=44)) <= 3, template.description


def selected_models(node: dict) -> list[dict]:
    """getSelectedModelsMetadata: the node's schema-valid entries whose name is one of its widget values."""
    if node["mode"] in (MUTED, BYPASSED):
        return []
    values = node.get("widgets_values") or []
    values = values if isinstance(values, list) else list(values.values())
    chosen = {v for v in values if isinstance(v, str) and v.strip()}
    return [m for m in node["properties"].get("models", []) if is_model_file(m) and m["name"] in chosen]


def is_model_file(entry) -> bool:
    """zModelFile: name, url (a URL), directory required; hash and hash_type optional strings."""
    if not isinstance(entry, dict):
        return False
    for key, kind in MODEL_FILE_REQUIRED.items():
        if not isinstance(entry.get(key), kind):
            return False
    if any(key in entry and not isinstance(entry[key], kind) for key, kind in MODEL_FILE_OPTIONAL.items()):
        return False
    url = urlparse(entry["url"])
    return bool(url.scheme and url.netloc)


def downloadable(model: dict) -> bool:
    """isModelDownloadable (its few whitelisted URLs aside)."""
    return model["url"].startswith(ALLOWED_SOURCES) and model["name"].endswith(ALLOWED_SUFFIXES)


def test_every_checkpoint_loader_offers_the_official_sdxl_base_release():
    assert workflow_build.MODELS == {SDXL_BASE["name"]: SDXL_BASE}
    for name in template_names():
        workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
        loaders = [n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"]
        assert loaders, name
        for node in loaders:
            assert node["properties"]["models"] == [SDXL_BASE], (name, node["properties"])
            assert set(SDXL_BASE) <= set(MODEL_FILE_REQUIRED) | set(MODEL_FILE_OPTIONAL)
            assert selected_models(node) == [SDXL_BASE], (name, node)
            assert downloadable(SDXL_BASE)
        api = json.loads((WORKFLOWS / workflow_build.api_name(name)).read_text())
        assert "properties" not in json.dumps(api), f"{name}: the API twin is what the frontend queues, no UI fields"


def test_the_restated_frontend_rules_reject_what_the_frontend_rejects():
    node = {"mode": 0, "properties": {"models": [SDXL_BASE]}, "widgets_values": [SDXL_BASE["name"]]}
    assert selected_models(node) == [SDXL_BASE]
    assert selected_models({**node, "widgets_values": ["other.safetensors"]}) == []
    assert selected_models({**node, "mode": BYPASSED}) == []
    assert selected_models({**node, "properties": {"models": [{**SDXL_BASE, "url": "not a url"}]}}) == []
    assert selected_models({**node, "properties": {"models": [{"name": SDXL_BASE["name"]}]}}) == []
    assert not downloadable({**SDXL_BASE, "url": "https://example.com/sd_xl_base_1.0.safetensors"})
    assert not downloadable({**SDXL_BASE, "name": "sd_xl_base_1.0"})
