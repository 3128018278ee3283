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
