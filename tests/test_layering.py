"""The package stands apart from the lab: no module under src/ imports ``research``, and every module imports on
its own in a fresh interpreter without the lab on the path (so there is no import circle that needs it)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from tests.paths import SRC


def _modules() -> list[str]:
    out = []
    for f in sorted((SRC / "detailpp").rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        if parts[-1] != "__main__":  # running it is its import
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_no_module_of_the_package_imports_the_lab():
    offenders = []
    for f in (SRC / "detailpp").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{f.relative_to(SRC)}: {n}" for n in names if n.split(".")[0] == "research"]
    assert not offenders


def test_every_module_imports_without_the_lab():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    code += "assert not any(k == 'research' or k.startswith('research.') for k in sys.modules)\n"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", code, *_modules()], cwd=SRC, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, counting imports inside functions too (a lazy import hides a
    circle from the interpreter, not from the design)."""
    modules = set(_modules())
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module in modules:
        path = SRC / (module.replace(".", "/") + ".py")
        if not path.is_file():
            path = SRC / module.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[module] |= {t for t in targets if t in modules and t not in (module, "detailpp")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one module."""
    order, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle_through_a_lazy_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    assert cycles(import_graph()) == []
