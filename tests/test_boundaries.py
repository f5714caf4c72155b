"""The import boundaries docs/ARCHITECTURE.md states, read from the source with `ast` (nothing is imported), and the
docs' maps of the code kept whole:

- masks/ imports no ComfyUI and nothing from nodes/, cli/, benchmarks/ or tests/;
- nodes/ imports nothing from cli/, benchmarks/ or tests/;
- cli/ and benchmarks/ import nothing from tests/ (shared fixtures live in cli/tiny_models.py and cli/tiny_pack/).

Every import counts, a function's lazy one included. A module reached through a `Path / "tests"` folder counts as
an import of tests/. docs/ARCHITECTURE.md's module map names every module of masks/, nodes/ and cli/ (or its
folder), and docs/TESTING.md every test file.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_maskattn"
FOLDERS = ("masks", "nodes", "cli", "benchmarks", "tests")
#: ComfyUI's own top-level modules and packages (the 2024 test host and current releases); a plain `import nodes`
#: is ComfyUI's nodes.py (the pack's nodes/ is reached relatively or as comfyui_maskattn.nodes)
COMFYUI = {"comfy", "comfy_extras", "comfy_execution", "comfy_api", "comfy_api_nodes", "comfy_config", "app",
           "folder_paths", "nodes", "server", "execution", "latent_preview", "node_helpers", "cuda_malloc", "main",
           "comfyui_version", "protocol", "utils"}
#: what a tests/ module is imported as when tests/ is on sys.path
TEST_MODULES = {p.stem for p in (REPO / "tests").glob("*.py")} | {"tests"}

FORBIDDEN = {
    "masks": {"comfyui", "nodes", "cli", "benchmarks", "tests"},
    "nodes": {"cli", "benchmarks", "tests"},
    "cli": {"tests"},
    "benchmarks": {"tests"},
}


def _absolute(name: str) -> str | None:
    top, _, rest = name.partition(".")
    if top == PACK_NAME:
        return rest.partition(".")[0] if rest.partition(".")[0] in FOLDERS else None
    if top in TEST_MODULES:
        return "tests"
    if top in ("masks", "cli", "benchmarks"):
        return top
    return "comfyui" if top in COMFYUI else None


def imports_of(source: str, folder: tuple[str, ...]) -> set[str]:
    """What a module in `folder` (its path parts below the repository) imports, as the pack folders it reaches
    ("masks", "nodes", "cli", "benchmarks", "tests") and "comfyui" for any ComfyUI module."""
    reached = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            reached |= {_absolute(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = list(folder[: len(folder) - (node.level - 1)])
            parts = base + (node.module.split(".") if node.module else [])
            tops = [parts[0]] if parts else [alias.name for alias in node.names]
            reached |= {top for top in tops if top in FOLDERS}
        elif isinstance(node, ast.ImportFrom):
            reached.add(_absolute(node.module))
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
              and node.right.value == "tests"):
            reached.add("tests")
    return reached - {None}


def test_imports_are_read_as_the_folders_they_reach():
    source = ("import torch\nfrom .gate import x\nfrom ..nodes import hooks\nimport comfy.model_management\n"
              "def f():\n    import folder_paths\n    from comfyui_maskattn.cli import host\n    import comfy_host\n"
              "ROOT = REPO / 'tests'\n")
    assert imports_of(source, ("masks",)) == {"masks", "nodes", "comfyui", "cli", "tests"}
    assert imports_of("import nodes\nfrom . import hooks\n", ("nodes",)) == {"comfyui", "nodes"}
    assert imports_of("from .. import masks\n", ("cli", "tiny_pack")) == {"cli"}
    assert imports_of("from .. import masks\n", ("nodes",)) == {"masks"}
    assert imports_of("from benchmarks.compbench import tinyt2i\nimport train_support\n", ("cli",)) == {
        "benchmarks", "tests"}


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_each_folder_keeps_its_import_boundary(part):
    modules = sorted((REPO / part).rglob("*.py"))
    assert modules
    broken = {}
    for path in modules:
        folder = path.relative_to(REPO).parts[:-1]
        reached = imports_of(path.read_text(), folder) & FORBIDDEN[part]
        if reached:
            broken[str(path.relative_to(REPO))] = sorted(reached)
    assert not broken, f"{part}/ must not import {sorted(FORBIDDEN[part])}: {broken}"


def test_the_module_map_names_every_module_and_testing_every_test_file():
    architecture = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    unnamed = []
    for part in ("masks", "nodes", "cli"):
        for path in sorted((REPO / part).rglob("*.py")):
            name = path.relative_to(REPO)
            folders = [f"`{'/'.join(name.parts[:i])}/`" for i in range(2, len(name.parts))]
            if path.name != "__init__.py" and f"`{name.as_posix()}`" not in architecture and not any(
                    folder in architecture for folder in folders):
                unnamed.append(name.as_posix())
    assert not unnamed, f"docs/ARCHITECTURE.md's module map does not name {unnamed}"
    testing = (REPO / "docs" / "TESTING.md").read_text()
    unlisted = [p.name for p in sorted((REPO / "tests").glob("test_*.py"))
                if f"`{p.name}" not in testing and f"`tests/{p.name}" not in testing]
    assert not unlisted, f"docs/TESTING.md does not list {unlisted}"
