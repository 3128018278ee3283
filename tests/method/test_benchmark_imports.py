"""The scripts of ``benchmarks/`` import one another with no circle (``benchmarks/reference/gpu.py`` and
``record.py`` once imported each other): each script puts its folder or ``benchmarks/reference`` on ``sys.path`` and
imports a sibling by its file name, so a name resolves to the one script of that stem. Imports inside functions
count too (a lazy import hides a circle from the interpreter, not from the design)."""

from __future__ import annotations

import ast
from collections import Counter

from tests.paths import BENCHMARKS
from tests.test_layering import cycles


def script_graph() -> dict[str, set[str]]:
    """Script stem -> the stems of the other scripts of ``benchmarks/`` it imports."""
    files = sorted(BENCHMARKS.rglob("*.py"))
    twice = [stem for stem, n in Counter(f.stem for f in files).items() if n > 1]
    assert not twice, f"two scripts of benchmarks/ share a name, which one an import reaches is ambiguous: {twice}"
    stems = {f.stem for f in files}
    graph: dict[str, set[str]] = {}
    for f in files:
        targets: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                targets |= {a.name.split(".")[0] for a in node.names}
        graph[f.stem] = (targets & stems) - {f.stem}
    return graph


def test_the_graph_sees_the_reference_scripts_imports():
    graph = script_graph()
    assert {"authors", "fingerprint", "noise", "scenarios"} <= graph["record"]
    assert graph["noise"] == {"scenarios"} and graph["scenarios"] == set()


def test_no_import_circle_among_the_benchmark_scripts():
    assert cycles(script_graph()) == []
