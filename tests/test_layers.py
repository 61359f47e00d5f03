"""The import structure of qm_server and qm_client: no cycles, and each layer below its callers.

Read from the source with ast (nothing is imported), so the check costs milliseconds and
names the offending import. Imports inside functions and under TYPE_CHECKING count too:
they tie modules together all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qm_server", "qm_client")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement of the file, resolved to absolute names."""
    package = (
        module_name(path)
        if path.name == "__init__.py"
        else module_name(path)[: -len(path.stem) - 1]
    )
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the modules of our packages it imports (a name is resolved to the longest
    module it falls in, so `from qm_server import errors` names qm_server.errors)."""
    paths = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for imported in imports_of(path):
            while imported and imported not in paths:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def offenders(edges: dict[str, set[str]], importer: str, forbidden: tuple[str, ...]) -> list[str]:
    """Imports from modules under `importer` of modules under any of `forbidden`."""
    return sorted(
        f"{source} -> {target}"
        for source, targets in edges.items()
        if source == importer or source.startswith(importer + ".")
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(graph()) == []


def test_the_client_and_the_server_share_no_code() -> None:
    edges = graph()
    assert offenders(edges, "qm_client", ("qm_server",)) == []
    assert offenders(edges, "qm_server", ("qm_client",)) == []


def test_the_store_sits_below_the_rules_and_the_grpc_face() -> None:
    above = ("qm_server.engine", "qm_server.servicer", "qm_server.server", "qm_server.subscription")
    assert offenders(graph(), "qm_server.store", above) == []


def test_the_engine_and_the_store_import_no_grpc() -> None:
    for path in [ROOT / "qm_server" / "engine.py", *(ROOT / "qm_server" / "store").rglob("*.py")]:
        grpc_imports = {i for i in imports_of(path) if i == "grpc" or i.startswith("grpc.")}
        assert grpc_imports == set(), path


def test_the_checker_sees_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert offenders({"x.y": {"z.w"}}, "x", ("z",)) == ["x.y -> z.w"]
