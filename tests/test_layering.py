"""The plan of the house (docs/architecture.md), enforced: each room of the package imports only the rooms below it
(:data:`ROOMS`), the engine and nursing import nothing of a UNet, there is no import circle, and the package stands
apart from the lab (no module under src/ imports ``research``; every module imports on its own in a fresh
interpreter without the lab on the path)."""

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


#: Each room of the package and the rooms it may import (by module prefix: ``detailpp.<room>``). A room is a
#: subpackage or a top-level module; ``__init__`` is the package's front door (``detailpp``). docs/architecture.md
#: draws the same table.
ROOMS: dict[str, set[str]] = {
    "errors": set(),
    "atomic": set(),
    "resources": set(),
    "config": {"errors"},
    "plan": {"errors"},
    "inputs": {"plan", "errors"},
    "hub": {"config", "errors"},
    "images": {"atomic"},
    "parsing": {"plan", "resources", "config", "errors"},
    "method": {"config", "plan", "errors"},
    "backbones": {"method", "config", "errors"},
    "pipelines": {"backbones", "method", "parsing", "hub", "config", "inputs", "plan", "resources", "errors"},
    "models": {"pipelines", "backbones", "method", "hub", "config", "inputs", "plan", "resources", "errors"},
    "bench": {"atomic", "config", "hub", "plan", "parsing", "resources", "errors"},
    "demo": {"models", "pipelines", "parsing", "config", "images", "inputs", "plan", "resources", "errors"},
    "cli": {
        "bench",
        "demo",
        "models",
        "pipelines",
        "parsing",
        "method",
        "config",
        "hub",
        "images",
        "inputs",
        "plan",
        "atomic",
        "resources",
        "errors",
    },
    "__init__": {"config", "parsing", "pipelines", "plan"},
}

#: What the engine and nursing must never import: a UNet (or a transformer) belongs behind the backbone seam.
DENOISER_SPECIFIC = ("detailpp.backbones", "detailpp.pipelines", "diffusers.models", "UNet2DConditionModel")


def room_of(module: str) -> str:
    """``detailpp.pipelines.sdxl`` -> ``pipelines``; ``detailpp`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def broken_rules(graph: dict[str, set[str]], rooms: dict[str, set[str]] = ROOMS) -> list[str]:
    """Every import of ``graph`` from one room into another that the room may not import, as "a -> b (room)"."""
    broken = []
    for module, targets in sorted(graph.items()):
        room = room_of(module)
        for target in sorted(targets):
            other = room_of(target)
            if other != room and other not in rooms.get(room, set()):
                broken.append(f"{module} -> {target} ({room} may not import {other})")
    return broken


def test_every_module_is_in_a_room():
    assert {room_of(m) for m in import_graph()} <= set(ROOMS), set(map(room_of, import_graph())) - set(ROOMS)


def test_each_room_imports_only_the_rooms_below_it():
    assert broken_rules(import_graph()) == []


def test_the_room_check_fails_when_a_rule_is_broken():
    """The check can fail: the engine importing a pipeline, and the parser importing the models, are reported."""
    graph = {**import_graph()}
    graph["detailpp.method.engine"] = graph["detailpp.method.engine"] | {"detailpp.pipelines.base"}
    graph["detailpp.parsing.nlp"] = graph["detailpp.parsing.nlp"] | {"detailpp.models.loading"}
    assert broken_rules(graph) == [
        "detailpp.method.engine -> detailpp.pipelines.base (method may not import pipelines)",
        "detailpp.parsing.nlp -> detailpp.models.loading (parsing may not import models)",
    ]


def imported_names(path) -> set[str]:
    """Every module and name a file imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``), lazily too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names), *(a.name for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_the_engine_and_nursing_import_nothing_of_a_denoiser():
    for name in ("engine", "nursing", "backbone", "attention", "masks", "latent_modification"):
        imported = imported_names(SRC / "detailpp" / "method" / f"{name}.py")
        found = sorted(n for n in imported if n.startswith(DENOISER_SPECIFIC) or n in DENOISER_SPECIFIC)
        assert found == [], f"method/{name}.py imports {found}"
