"""Training data: caption/scene batches sampled on the CPU by background threads, and the world's vocabulary."""

from __future__ import annotations

import queue
import threading

import numpy as np

from research.toy.scenes import (
    CaptionTokenizer,
    sample_scenes,
)


class SceneStream:
    """Caption/scene batches sampled on the CPU by background threads (seeded; deterministic order).

    Worker ``k`` of ``workers`` has its own generator and queue; batches are taken round-robin, so the stream is
    the same for a seed whatever the threads' timing.
    """

    def __init__(
        self, batch_size: int, seed: int, attribute_drop: float, layout: str = "uniform", workers: int = 1
    ) -> None:
        self.tok = CaptionTokenizer()
        self.batch_size = batch_size
        self.attribute_drop = attribute_drop
        self.layout = layout
        self.queues: list[queue.Queue] = [queue.Queue(maxsize=4) for _ in range(workers)]
        self.turn = 0
        self.stop = threading.Event()
        rngs = (
            [np.random.default_rng(seed)]
            if workers == 1
            else [np.random.default_rng([seed, k]) for k in range(workers)]
        )
        self.threads = [
            threading.Thread(target=self._work, args=(rng, q), daemon=True)
            for rng, q in zip(rngs, self.queues, strict=True)
        ]
        for t in self.threads:
            t.start()

    def _work(self, rng: np.random.Generator, q: queue.Queue) -> None:
        while not self.stop.is_set():
            batch = sample_scenes(
                self.batch_size, rng, split="train", attribute_drop=self.attribute_drop, layout=self.layout
            )
            ids1 = self.tok(batch.captions)
            ids2 = self.tok(batch.captions, pad_id=0)
            while not self.stop.is_set():
                try:
                    q.put((batch, ids1, ids2), timeout=0.5)
                    break
                except queue.Full:
                    continue

    def next(self):
        q = self.queues[self.turn]
        self.turn = (self.turn + 1) % len(self.queues)
        return q.get()

    def close(self) -> None:
        self.stop.set()


def _vocabulary() -> list[str]:
    from research.toy.scenes import COLOUR_NAMES, SHAPES, TEMPLATES, TEXTURES

    words = {"a", "an", ","} | set(COLOUR_NAMES) | set(SHAPES) | set(TEXTURES)
    for ts in TEMPLATES.values():
        for t in ts:
            for w in t.replace(",", " ").split():
                if not w.startswith("{"):
                    words.add(w)
    return sorted(words)
