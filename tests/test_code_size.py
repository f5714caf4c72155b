"""One job per module: no module of the pack over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES.

The pack is what ComfyUI loads and the tools it ships: __init__.py, masks/, nodes/, cli/ (tests/ and benchmarks/
are not part of it). Read with `ast`, so nothing is imported.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_PARTS = ("__init__.py", "masks", "nodes", "cli")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def pack_modules() -> list[Path]:
    found = []
    for part in PACK_PARTS:
        path = REPO / part
        found += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return found


def long_functions(source: str) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function or method longer than MAX_FUNCTION_LINES, nested ones included."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found.append((name, lines))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_the_size_check_finds_long_functions_and_methods_at_any_depth():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = (f"def short():\n    pass\n\ndef long():\n{body}\n\n"
              f"class Node:\n    def method(self):\n{body.replace('    ', '        ')}\n\n"
              f"def outer():\n    def inner():\n{body.replace('    ', '        ')}\n    return inner\n")
    assert long_functions(source) == [("long", MAX_FUNCTION_LINES + 1), ("Node.method", MAX_FUNCTION_LINES + 1),
                                      ("outer", MAX_FUNCTION_LINES + 3), ("outer.inner", MAX_FUNCTION_LINES + 1)]


def test_no_module_of_the_pack_is_over_the_limit():
    modules = pack_modules()
    assert len(modules) > 30 and REPO / "nodes" / "hooks.py" in modules and REPO / "cli" / "train.py" in modules
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in modules}
    over = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them by job): {over}"


def test_no_function_of_the_pack_is_over_the_limit():
    over = {f"{p.relative_to(REPO)}:{name}": lines
            for p in pack_modules() for name, lines in long_functions(p.read_text())}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {over}"
