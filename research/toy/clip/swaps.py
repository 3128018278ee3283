"""Caption pairs for the swapped-attribute probe: a 2-object scene's true caption and a twin that differs from it.

Kinds (each twin keeps the true caption's template and object order, and names every attribute):

* ``"plain"``: another scene's caption (plain retrieval: does the encoder know anything?).
* ``"colour_swap"`` / ``"texture_swap"`` / ``"shape_swap"``: the two objects' colours / textures / shapes exchanged.
  The twin has the true caption's bag of words (articles aside: "a yellow" / "an orange"), so a bag-of-words
  encoder scores both alike (chance, 50 %).
  Note that a shape swap describes the same scene as a colour-and-texture swap ("a red circle and a blue square"
  vs "a red square and a blue circle"): it is a binding test too, not a control.
* ``"colour_replace"`` / ``"shape_replace"``: the first-named object's colour / shape replaced by one the scene
  does not have. The twin's bag of words differs by one word (articles aside), so even a bag of words tells them
  apart: the control.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from research.toy.scenes import COLOUR_NAMES, SHAPES, TEMPLATES, ObjectSpec, SceneBatch, compose_caption

SWAP_KINDS = ("colour_swap", "texture_swap", "shape_swap")
CONTROL_KINDS = ("colour_replace", "shape_replace")
KINDS = ("plain", *SWAP_KINDS, *CONTROL_KINDS)
_ATTRIBUTE = {"colour_swap": "colour", "texture_swap": "texture", "shape_swap": "shape"}


@dataclass(frozen=True)
class ProbePair:
    """Scene ``index``'s true caption and its twin of ``kind``."""

    index: int
    kind: str
    true: str
    alt: str


def caption_objects(batch: SceneBatch, i: int) -> tuple[list[ObjectSpec], int]:
    """Scene ``i``'s objects in caption order and the template number that joins them into its caption (the caption
    must name every attribute: scenes drawn with ``attribute_drop=0``)."""
    objs = list(batch.prompt_spec(i).objects)
    for t in range(len(TEMPLATES[len(objs)])):
        if compose_caption(objs, t) == batch.captions[i]:
            return objs, t
    raise ValueError(
        f"caption {batch.captions[i]!r} leaves an attribute out (draw probe scenes with attribute_drop=0)"
    )


def swap_twin(objs: list[ObjectSpec], template: int, kind: str) -> str | None:
    """The caption with the two objects' attribute of ``kind`` exchanged; ``None`` when they share it."""
    a, b = objs
    attr = _ATTRIBUTE[kind]
    va, vb = getattr(a, attr), getattr(b, attr)
    if va == vb:
        return None
    return compose_caption([replace(a, **{attr: vb}), replace(b, **{attr: va})], template)


def replace_twin(objs: list[ObjectSpec], template: int, kind: str, rng: np.random.Generator) -> str:
    """The caption with the first object's colour or shape replaced by one no object of the scene has."""
    attr, names = ("colour", COLOUR_NAMES) if kind == "colour_replace" else ("shape", SHAPES)
    absent = [n for n in names if n not in {getattr(o, attr) for o in objs}]
    new = absent[int(rng.integers(len(absent)))]
    return compose_caption([replace(objs[0], **{attr: new}), *objs[1:]], template)


def probe_pairs(batch: SceneBatch, kind: str, rng: np.random.Generator | int = 0) -> list[ProbePair]:
    """Every eligible pair of ``kind`` over a batch of 2-object scenes (swaps skip scenes whose objects share the
    swapped attribute; ``"plain"`` pairs each scene with a random scene of another caption)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out = []
    for i in range(len(batch)):
        if batch.n_objects[i] != 2:
            raise ValueError("the probe's scenes have 2 objects")
        true = batch.captions[i]
        if kind == "plain":
            j = int(rng.integers(len(batch) - 1))
            j += j >= i
            alt = batch.captions[j] if batch.captions[j] != true else None
        else:
            objs, t = caption_objects(batch, i)
            alt = swap_twin(objs, t, kind) if kind in SWAP_KINDS else replace_twin(objs, t, kind, rng)
        if alt is not None:
            out.append(ProbePair(i, kind, true, alt))
    return out
