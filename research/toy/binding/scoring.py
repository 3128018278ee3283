"""Scoring one image: the judged objects against the prompt, and the subject masks against the judge's regions."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from research.toy.scenes import ObjectSpec

#: Mask thresholds at which the masks' IoU is also reported (the method's own tau is the main number).
IOU_TAUS: tuple[float, ...] = (0.3, 0.5, 0.7)


# ----------------------------------------------------------------------------------------------------------------
# Metrics on one image


def score_seen(expected: Sequence[ObjectSpec], seen: Sequence) -> dict:
    """Object- and image-level binding of judged objects ``seen`` (as :func:`~research.toy.judge.score_image`),
    with the kinds of mistake (``"errors"``: :func:`~research.toy.judge.classify_errors`)."""
    from research.toy.judge import classify_errors, match_objects

    found = match_objects(expected, seen)
    return {
        "found": [bool(f) for f in found],
        "image_correct": bool(found.all() and len(seen) == len(expected)),
        "n_seen": len(seen),
        "seen": [[o.shape, o.colour, o.texture] for o in seen],
        "errors": classify_errors(expected, seen),
    }


def assign_regions(expected: Sequence[ObjectSpec], seen: Sequence) -> list[int | None]:
    """One-to-one: for each prompted object, the judged object of its shape that best agrees on colour (weight 2)
    and texture (weight 1); ``None`` where no judged object of that shape is left."""
    cands = [[j for j, s in enumerate(seen) if s.shape == e.shape] for e in expected]

    def gain(i: int, j: int | None) -> float:
        if j is None:
            return 0.0
        e, s = expected[i], seen[j]
        return 10.0 + 2.0 * (e.colour == s.colour) + 1.0 * (e.texture == s.texture)

    best, best_gain = [None] * len(expected), -1.0
    for choice in itertools.product(*[[*c, None] for c in cands]):
        used = [j for j in choice if j is not None]
        if len(used) != len(set(used)):
            continue
        g = sum(gain(i, j) for i, j in enumerate(choice))
        if g > best_gain:
            best, best_gain = list(choice), g
    return best


def upsample_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) masks (bool or float) to (K, H, W) by nearest-neighbour repetition (H, W multiples of h, w)."""
    k, h, w = masks.shape
    fy, fx = size[0] // h, size[1] // w
    if fy * h != size[0] or fx * w != size[1]:
        idx_y = (np.arange(size[0]) * h // size[0]).clip(0, h - 1)
        idx_x = (np.arange(size[1]) * w // size[1]).clip(0, w - 1)
        return masks[:, idx_y][:, :, idx_x]
    return masks.repeat(fy, axis=1).repeat(fx, axis=2)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def mask_records(
    maps: np.ndarray, tau: float, branch_obj: Sequence[int | None], regions: Sequence[np.ndarray | None]
) -> list[dict]:
    """IoU of each branch's subject mask with the judge's region of its object.

    Args:
        maps: (branches, H, W) normalised subject maps at image size.
        tau: the method's mask threshold (binary mask = map > tau).
        branch_obj: prompted object index of each branch (:func:`branch_objects`).
        regions: per prompted object, the judge's region (H, W bool) or ``None`` when not found.
    """
    out = []
    for b, k in enumerate(branch_obj):
        m = maps[b]
        region = regions[k] if k is not None else None
        rec: dict[str, Any] = {"object": k, "mask_area": float((m > tau).mean())}
        if region is None:
            rec.update(iou=None, iou_tau={}, peak_inside=None, region_area=None)
        else:
            peak = np.unravel_index(int(np.argmax(m)), m.shape)
            rec.update(
                iou=iou(m > tau, region),
                iou_tau={f"{t:g}": iou(m > t, region) for t in IOU_TAUS},
                peak_inside=bool(region[peak]),
                region_area=float(region.mean()),
            )
        out.append(rec)
    return out


def foreground(seen: Sequence, shape: tuple[int, int]) -> np.ndarray:
    fg = np.zeros(shape, dtype=bool)
    for s in seen:
        fg |= s.mask
    return fg


def match_shapes(expected: Sequence[ObjectSpec], seen: Sequence) -> float:
    """Share of prompted shapes found (one-to-one) among judged objects: does the base branch draw the layout?"""
    from research.toy.judge import match_objects

    return float(match_objects(expected, seen, attributes=("shape",)).mean()) if expected else 1.0
