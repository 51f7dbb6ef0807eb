"""No import inside a function may exist only to dodge a package cycle (issue #10,
point 2). Imports inside functions are allowed for start-up cost (TensorFlow, highdicom,
Celery are loaded only by the processes that use them), but none of them may close a
cycle: the module imported lazily must not itself (directly or through others, lazy ones
included) import the module that imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("apps", "cxr", "db", "dicom_node", "worker", "ml", "web")


def _function_imports() -> list[tuple[str, int, str]]:
    """(importing module, line, imported project module) for every import that sits
    inside a function body (TYPE_CHECKING blocks are module level and not counted)."""
    out: list[tuple[str, int, str]] = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            mod = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mod = mod.removesuffix(".__init__")
            tree = ast.parse(path.read_text(), str(path))
            for fn in ast.walk(tree):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    names: list[str] = []
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        names = [node.module]
                    for name in names:
                        if name.split(".")[0] in PACKAGES:
                            out.append((mod, node.lineno, name))
    return out


def test_no_function_level_import_closes_a_cycle() -> None:
    graph = grimp.build_graph(*PACKAGES)
    lazy = _function_imports()
    assert len(lazy) > 20  # the scan sees them (there are many, for start-up cost)
    cycles = []
    for importer, line, name in lazy:
        target = name
        while target not in graph.modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target not in graph.modules or target == importer:
            continue
        back = graph.find_shortest_chain(importer=target, imported=importer)
        if back:
            cycles.append(f"{importer}:{line} imports {name}, which imports back: {back}")
    assert cycles == []


def test_the_check_sees_a_cycle() -> None:
    """The same query on a known pair: the stages import the foundation, so a lazy import
    of a stage from the foundation would be reported."""
    graph = grimp.build_graph(*PACKAGES)
    assert graph.find_shortest_chain(importer="worker.pipeline", imported="cxr.settings")
