"""ReCoKDLib's modules import each other without a circle: a lower layer (checkpoint, data I/O,
preprocessing, post-processing, model loading) never imports a higher one, so any module can be
imported first and the loaders sit below inference (issue 15's "model-loading layer without a loop")."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ReCoKDLib"


def module_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules it imports}`` read with ``ast`` (imports inside functions count: they run
    later, but they still tie the two modules together). A module's own parent packages are left out."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts).removesuffix(".__init__")] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package_name = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package_name.split(".")[: len(package_name.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in filter(None, map(resolve, targets)):
                if target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def test_recokdlib_has_no_import_circle():
    graph = module_graph(PACKAGE)
    assert "ReCoKDLib.postprocess" in graph and "ReCoKDLib.data.boxes" in graph["ReCoKDLib.postprocess"]
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        raise AssertionError(f"ReCoKDLib modules import each other in a circle: {' -> '.join(error.args[1])}") from None


def test_the_check_finds_a_circle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import x\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    graph = module_graph(package)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError:
        return
    raise AssertionError("the circle pkg.a <-> pkg.b was not found")
