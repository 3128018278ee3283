"""Shared fixtures, and the map of the tests: one folder per room of the house (``docs/architecture.md``).

=================  =======================================================================================
``tests/``         the house itself: layering (no import of the lab, no circle), function length
``method/``        the paper's steps on tensors (attention, masks, ALM, nursing), the engine, parity with the
                   authors' recorded outputs (``fixtures/authors_reference.safetensors``)
``pipelines/``     the Detail++ pipelines on the tiny random SDXL: equivalences, LoRA, ``compile_detail``
``loading/``       model families, a model's recommended settings (``detail_config.json``)
``parsing/``       prompt -> plan: the spaCy parser, its lexicon, the prompt corpus (``data/``)
``cli/``           ``detailpp generate`` and the command line's shared behaviour
``bench/``         ``detailpp bench``: suites, sharded resumable runs, metrics on tiny random scorers, reports
``demo/``          the Gradio demo (handlers, the command, the page in headless Chromium)
``scripts/``       the scripts outside the wheel (``benchmarks/``: GPU timing, the reference recorder)
=================  =======================================================================================

The lab's tests live in ``research/tests``. Data files stay in ``tests/fixtures`` and ``tests/data``
(:mod:`tests.paths` names them). Helpers a folder shares are plain modules there (``tests/bench/fakes.py``,
``tests/bench/tiny_models.py``), imported as ``tests.bench.fakes``: the repository root is on ``sys.path``
(``pyproject.toml``: ``pythonpath = ["."]``).

Fixtures:
    tiny_components: the tiny random SDXL's seven components (:func:`detailpp.models.tiny.tiny_components`, seed 0),
        fresh for each test (a test may change them).
    tiny_pipe: the tiny random :class:`~detailpp.DetailPlusPlusPipeline` (seed 0, progress bar off), built once per
        test module: tests that share it leave it as they found it (processors, adapters, scheduler); a test that
        changes it for good builds its own (:func:`detailpp.models.tiny.build_tiny_pipeline`).
"""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_components() -> dict:
    from detailpp.models.tiny import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def tiny_pipe():
    from detailpp.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)
