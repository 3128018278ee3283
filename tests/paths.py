"""Where things are, for tests in any folder under ``tests/`` (import: ``from tests.paths import REPO``).

``pyproject.toml``'s pytest settings put the repository root on ``sys.path`` (``pythonpath = ["."]``), so ``tests``
is a package there and nothing needs a ``sys.path`` hack.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: The repository's root (the folder of ``pyproject.toml``).
REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
TESTS = REPO / "tests"
#: Recorded reference outputs (``authors_reference.safetensors``).
FIXTURES = TESTS / "fixtures"
#: Test data (``prompt_corpus.jsonl``).
DATA = TESTS / "data"
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = REPO / "scripts"


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Import a script of ``benchmarks/`` or ``scripts/`` (not packages) from its file, as module ``name``.

    The module is registered in ``sys.modules`` first: dataclasses look their module up there.
    """
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
