"""The swapped-attribute retrieval probe of a pretrained toy CLIP pair's text encoder.

For each held-out 2-object scene, the pair's image embedding scores its true caption against a twin
(:mod:`research.toy.clip.swaps`): the colours, textures or shapes of the two objects exchanged (near 50 %, chance,
means the text encoder is a bag of words for that attribute), one attribute replaced by an absent one (the control a
bag of words passes), or another scene's caption (plain retrieval). Accuracy counts a tie as half; the interval is
Wilson's 95 % score interval. ``text_cosine`` is the mean cosine similarity of the two captions' pooled text
embeddings (1: the encoder cannot tell them apart at all).

Run as ``python -m research.toy.clip.probe --model DIR`` (``DIR`` as written by :mod:`research.toy.clip.pretrain`:
``clip/`` scores images, ``text_encoder_2/`` embeds the captions: the exported encoder is the one probed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from research.toy.clip.swaps import KINDS, ProbePair, probe_pairs
from research.toy.scenes import CaptionTokenizer, SceneBatch, render, sample_scenes

logger = logging.getLogger(__name__)
#: ``scorer(indices, captions)``: one score per (scene index, caption) pair, higher is a better match.
Scorer = Callable[[np.ndarray, list[str]], np.ndarray]


@dataclass(frozen=True)
class ProbeResult:
    kind: str
    n: int
    accuracy: float  # share of pairs whose true caption scores higher (ties count half)
    low: float  # Wilson 95 % interval
    high: float


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval of a proportion (``successes`` may be fractional: ties count half)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    return lo, 1.0 if successes >= n else min(1.0, centre + half)


def score_pairs(pairs: Sequence[ProbePair], scorer: Scorer, kind: str) -> ProbeResult:
    """Accuracy of ``scorer`` at preferring each pair's true caption to its twin."""
    idx = np.array([p.index for p in pairs], dtype=np.int64)
    s_true = np.asarray(scorer(idx, [p.true for p in pairs]), dtype=np.float64)
    s_alt = np.asarray(scorer(idx, [p.alt for p in pairs]), dtype=np.float64)
    wins = float((s_true > s_alt).sum() + 0.5 * (s_true == s_alt).sum())
    lo, hi = wilson_interval(wins, len(pairs))
    return ProbeResult(kind, len(pairs), wins / max(len(pairs), 1), lo, hi)


def probe(batch: SceneBatch, scorer: Scorer, kinds: Sequence[str] = KINDS, seed: int = 0) -> list[ProbeResult]:
    """One :class:`ProbeResult` per kind over a batch of 2-object scenes (drawn with ``attribute_drop=0``)."""
    rng = np.random.default_rng(seed)
    return [score_pairs(probe_pairs(batch, k, rng), scorer, k) for k in kinds]


class ClipScorer:
    """Cosine similarity of a CLIP pair's image embeddings (of ``images``, scaled to [-1, 1]) and the pooled
    projection of a :class:`~transformers.CLIPTextModelWithProjection`."""

    def __init__(self, clip, text_encoder, images: torch.Tensor, batch_size: int = 256) -> None:
        self.text_encoder = text_encoder
        self.tok = CaptionTokenizer()
        self.batch_size = batch_size
        with torch.no_grad():
            embs = []
            for chunk in images.split(batch_size):
                pooled = clip.vision_model(pixel_values=chunk * 2 - 1).pooler_output
                embs.append(clip.visual_projection(pooled))
            self.image_embeds = torch.nn.functional.normalize(torch.cat(embs), dim=-1)

    def text_embeds(self, captions: list[str]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(captions), self.batch_size):
                ids = torch.as_tensor(self.tok(captions[i : i + self.batch_size]))
                out.append(self.text_encoder(ids).text_embeds)
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def __call__(self, idx: np.ndarray, captions: list[str]) -> np.ndarray:
        t = self.text_embeds(captions)
        return (self.image_embeds[torch.as_tensor(idx)] * t).sum(-1).numpy()


def probe_scenes(n: int, seed: int, split: str) -> SceneBatch:
    """``n`` 2-object scenes of ``split`` (``"train"``: seen colour-shape pairs, ``"held_out"``: at least one pair
    never shown in a multi-object training scene), every attribute named."""
    return sample_scenes(n, np.random.default_rng([seed, 1_000_003]), split=split, n_objects=2, attribute_drop=0.0)


def probe_model(folder: str | Path, n: int = 1000, seed: int = 0, splits=("train", "held_out")) -> dict:
    """Probe results of a pretrained folder, by split: ``{split: [ProbeResult as dict, ...]}``."""
    from transformers import CLIPModel, CLIPTextModelWithProjection

    folder = Path(folder)
    clip = CLIPModel.from_pretrained(folder / "clip", dtype=torch.float32).eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=torch.float32).eval()
    out = {}
    for split in splits:
        batch = probe_scenes(n, seed, split)
        images, _ = render(batch, "cpu", image_size=clip.config.vision_config.image_size)
        scorer = ClipScorer(clip, te2, images)
        rows = [asdict(r) for r in probe(batch, scorer, seed=seed)]
        rng = np.random.default_rng(seed)  # the same pairs again (probe draws them in this order)
        for row, kind in zip(rows, KINDS, strict=True):
            row["text_cosine"] = text_cosine(scorer, probe_pairs(batch, kind, rng))
        out[split] = rows
    return out


def text_cosine(scorer: ClipScorer, pairs: Sequence[ProbePair]) -> float:
    """Mean cosine similarity of the pooled text embeddings of each pair's true caption and its twin."""
    a, b = scorer.text_embeds([p.true for p in pairs]), scorer.text_embeds([p.alt for p in pairs])
    return float((a * b).sum(-1).mean())


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description="Swapped-attribute retrieval probe of a toy CLIP pair.")
    p.add_argument("--model", required=True, help="folder written by research.toy.clip.pretrain")
    p.add_argument("--n", type=int, default=1000, help="2-object scenes per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", nargs="+", default=["train", "held_out"], choices=["train", "held_out"])
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    res = probe_model(a.model, a.n, a.seed, tuple(a.splits))
    for split, rows in res.items():
        for r in rows:
            logger.info(
                "%-9s %-15s n=%4d accuracy=%.1f%% [%.1f, %.1f] text cosine %.3f",
                split, r["kind"], r["n"], 100 * r["accuracy"], 100 * r["low"], 100 * r["high"], r["text_cosine"],
            )  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"model": str(a.model), "n": a.n, "seed": a.seed, **res}, indent=1))
    return res


if __name__ == "__main__":
    main()
