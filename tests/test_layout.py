"""The house's walls, checked from the source: no import circles in producer/ or worker/, the contract imports rq in
one module only, the producer never imports the worker or TensorFlow, the inference library knows nothing of Redis,
rq or the producer beyond the contract's codes and defaults, and no module imports another module's private names.

The import graph counts every import that runs (module level and inside functions); imports under
``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("producer", "worker")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _runtime_imports(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def _imported(module: str, path: Path, known: set[str]) -> dict[str, list[str]]:
    """Every module ``module`` imports at run time -> the names it takes from it."""
    out: dict[str, list[str]] = {}
    for node in _runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.setdefault(alias.name, [])
            continue
        assert node.level == 0, f"{module}: relative import (the project imports by absolute names)"
        base = node.module or ""
        for alias in node.names:
            target = f"{base}.{alias.name}"
            if target in known:  # `from package import module`
                out.setdefault(target, [])
            else:
                out.setdefault(base, []).append(alias.name)
    return out


def _graph() -> dict[str, dict[str, list[str]]]:
    modules = _modules()
    return {name: _imported(name, path, set(modules)) for name, path in modules.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _project_edges(graph: dict[str, dict[str, list[str]]]) -> dict[str, set[str]]:
    """Module -> project modules it imports; importing ``a.b.c`` also runs ``a`` and ``a.b`` (their __init__)."""
    edges: dict[str, set[str]] = {}
    for module, imported in graph.items():
        targets = set()
        for target in imported:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in graph and prefix != module and not module.startswith(prefix + "."):
                    targets.add(prefix)
        edges[module] = targets
    return edges


def test_no_import_circles_in_producer_or_worker() -> None:
    assert _cycles(_project_edges(_graph())) == []


def test_the_producer_never_imports_the_worker_or_tensorflow() -> None:
    for module, imported in _graph().items():
        if module.startswith("producer"):
            bad = [t for t in imported if t.split(".")[0] in ("worker", "tensorflow", "keras", "h5py")]
            assert bad == [], f"{module} imports {bad}"


def test_the_contract_imports_rq_in_one_module_only() -> None:
    users = sorted(
        module
        for module, imported in _graph().items()
        if module.startswith("producer.contract") and any(t.split(".")[0] == "rq" for t in imported)
    )
    assert users == ["producer.contract.rqjob"]


def test_the_inference_library_knows_no_redis_rq_or_producer_beyond_the_contract() -> None:
    # error codes and the one exception tree, the shared defaults, and the distance: facts both sides must share
    allowed = {f"producer.contract.{m}" for m in ("codes", "errors", "defaults", "metric")}
    for module, imported in _graph().items():
        if module.startswith("worker.inference"):
            bad = [
                t
                for t in imported
                if t.split(".")[0] in ("redis", "rq", "worker.batching", "worker.gallery")
                or (t.startswith("producer") and t not in allowed)
                or t.startswith(("worker.batching", "worker.gallery", "worker.runtime"))
            ]
            assert bad == [], f"{module} imports {bad}"


def test_no_module_imports_another_modules_private_names() -> None:
    for module, imported in _graph().items():
        for target, names in imported.items():
            if target.split(".")[0] in PACKAGES:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert private == [], f"{module} imports {private} from {target}"
