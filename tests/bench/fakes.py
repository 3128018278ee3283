"""A fake generator and scorer for the bench runner's tests: deterministic images from (prompt, seed), scores from
pixel means; shared by test_bench_runner.py (and its torchrun workers) and test_bench_report_cli.py."""

from __future__ import annotations

import zlib

import numpy as np

from detailpp.bench.generation import run_identity
from detailpp.bench.suites import Suite

SUITE = Suite("custom", ("a red car and a blue bench", "a green dog", "a cat_with underscores / slash", "a bowl"))
IPP = 3


def fake_generate(prompt: str, seed: int):
    """A 16x16 RGB image that depends on ``prompt`` and ``seed`` only."""
    from PIL import Image

    rng = np.random.RandomState((seed * 7919 + zlib.crc32(prompt.encode())) % 2**32)
    return Image.fromarray((rng.rand(16, 16, 3) * 255).astype("uint8"))


def identity(**settings):
    """The run identity of the fake method on :data:`SUITE` (``settings`` over ``steps=2``)."""
    return run_identity(SUITE, "fake", "fake-model", {"steps": 2, **settings}, IPP)


class CountingScorer:
    """Scores an image by its mean pixel; counts its calls and is interrupted at call ``fail_on_call``."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    def score(self, images, prompts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        return [(float(np.asarray(im).mean() / 255), {"n": len(p)}) for im, p in zip(images, prompts, strict=True)]
