"""Every node has a help page where ComfyUI's frontend looks for it, and the page names every input and output.

The frontend's node help panel fetches `/extensions/<pack>/docs/<NodeClass>.md` (or `<NodeClass>/<locale>.md`),
i.e. `<WEB_DIRECTORY>/docs/` of this pack. The pure tests read the registered node ids from nodes/*.py without a
host; the host test asks each class for its INPUT_TYPES.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "web" / "docs"
SECTIONS = ("## Inputs", "## Outputs", "## Example")


def registered_node_ids() -> set[str]:
    """The keys of every NODE_CLASS_MAPPINGS dict literal in nodes/*.py."""
    ids = set()
    for path in sorted((REPO / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                    and any(isinstance(t, ast.Name) and t.id == "NODE_CLASS_MAPPINGS" for t in node.targets)):
                ids |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return ids


def named_in(page: str) -> set[str]:
    """Names written in backticks on a page, with `x_1` … `x_4` standing for x_1, x_2, x_3, x_4."""
    names = set(re.findall(r"`([A-Za-z_][\w]*)`", page))
    for stem, first, last in re.findall(r"`([A-Za-z_]\w*?)_(\d+)`\s*(?:…|\.\.\.?)\s*`\1_(\d+)`", page):
        names |= {f"{stem}_{i}" for i in range(int(first), int(last) + 1)}
    return names


def test_the_web_directory_is_where_the_help_pages_live():
    text = (REPO / "__init__.py").read_text(encoding="utf-8")
    assert re.search(r'WEB_DIRECTORY\s*=\s*"\./web"', text)


def test_every_registered_node_has_a_help_page_with_inputs_outputs_and_an_example():
    ids = registered_node_ids()
    assert {"MaskAttnApply", "MaskAttnZeroShotGates", "MaskAttnTrainGates"} <= ids, ids
    missing = sorted(i for i in ids if not (DOCS / f"{i}.md").is_file())
    assert not missing, f"no help page web/docs/<id>.md for {missing}"
    for node_id in sorted(ids):
        page = (DOCS / f"{node_id}.md").read_text(encoding="utf-8")
        assert page.startswith("# "), node_id
        for section in SECTIONS:
            assert section in page, f"{node_id}.md has no '{section}'"


def test_no_help_page_for_a_node_that_does_not_exist():
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages <= registered_node_ids(), pages - registered_node_ids()


def test_a_range_of_sockets_counts_as_naming_each():
    assert named_in("`mask_1` … `mask_4` and `clip`") == {"mask_1", "mask_2", "mask_3", "mask_4", "clip"}
    assert "mask_2" not in named_in("`mask_1` and `mask_4`")


@pytest.mark.parametrize("node_id", sorted(registered_node_ids()))
def test_the_help_page_names_every_input_and_output(host, node_id):
    from comfyui_maskattn.nodes import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    inputs = [name for group in ("required", "optional") for name in spec.get(group, {})]
    outputs = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
    named = named_in((DOCS / f"{node_id}.md").read_text(encoding="utf-8"))
    assert not [n for n in inputs if n not in named], f"{node_id}.md does not name these inputs"
    assert not [n for n in outputs if n not in named], f"{node_id}.md does not name these outputs"
