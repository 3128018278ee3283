"""Every function of the product (``src/detailpp``) fits on a screen: at most 80 lines from ``def`` to its last line,
docstring included (issue 16). A longer one is split into named steps."""

from __future__ import annotations

import ast

from tests.paths import SRC

MAX_LINES = 80


def function_lengths(root=SRC / "detailpp") -> dict[str, int]:
    """``"<file>::<Class.function>"`` -> lines, for every function and method (nested ones too) under ``root``."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, file: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    lengths[f"{file}::{name}"] = child.end_lineno - child.lineno + 1
                visit(child, file, name + ".")
            else:
                visit(child, file, prefix)

    for path in sorted(root.rglob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8")), path.relative_to(root).as_posix(), "")
    return lengths


def test_the_counter_sees_methods_and_nested_functions():
    lengths = function_lengths()
    assert {"config.py::DetailConfig.validate", "bench/scoring.py::run_scoring.is_scored"} <= set(lengths)
    assert lengths["bench/scoring.py::run_scoring.is_scored"] == 2


def test_every_product_function_is_at_most_80_lines():
    lengths = function_lengths()
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not long, f"functions over {MAX_LINES} lines (split them into named steps): {long}"
