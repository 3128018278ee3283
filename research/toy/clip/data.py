"""Training batches of the CLIP pair: rendered toy scenes and their tokenized captions, one seeded draw per step.

Step ``s`` of a run with seed ``seed`` always draws the same scenes (``numpy.random.default_rng([seed, s])``), so a
resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch

from research.toy.scenes import CaptionTokenizer, render, sample_scenes


def used_token_ids(tok: CaptionTokenizer) -> list[int]:
    """Every token id the toy world's captions can contain (start, end, and the words' pieces)."""
    from research.toy.training.data import _vocabulary

    return sorted({tok.bos, tok.eos, 0} | {i for w in _vocabulary() for i in tok._word(w)})


def shuffle_words(captions: list[str], rng: np.random.Generator) -> list[str]:
    """Each caption with its words in a random order (commas become words): the same bag of words, no binding by
    word order."""
    out = []
    for c in captions:
        words = c.replace(",", " ,").split()
        out.append(" ".join(words[k] for k in rng.permutation(len(words))))
    return out


def scene_batch(
    tok: CaptionTokenizer,
    seed: int,
    step: int,
    batch_size: int,
    image_size: int,
    attribute_drop: float,
    device: torch.device | str = "cpu",
    shuffle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, input_ids)`` of step ``step``: ``batch_size`` training-split scenes rendered at
    ``image_size`` and scaled to [-1, 1], and their captions' 77 CLIP token ids (padded with the end token);
    ``shuffle``: the captions' words in a random order (:func:`shuffle_words`)."""
    rng = np.random.default_rng([seed, step])
    batch = sample_scenes(batch_size, rng, split="train", attribute_drop=attribute_drop)
    images, _ = render(batch, device, image_size=image_size)
    captions = shuffle_words(batch.captions, rng) if shuffle else batch.captions
    ids = torch.as_tensor(tok(captions), device=device)
    return images * 2 - 1, ids
