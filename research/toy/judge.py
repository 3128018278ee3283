"""The toy world's judge: reads an RGB image and returns the objects it sees with shape, colour, texture and mask.

Classical image analysis, relative to the image's own background, so that the colour drift, noise and blur of
generated images do not fool it:

1. background = per-channel median of a 3-pixel border frame; foreground = pixels farther than ``fg_threshold``
   from it (RGB distance), cleaned by a 3x3 majority vote, holes filled;
2. objects = 8-connected components of at least ``min_area`` pixels;
3. shape = the best intersection-over-union of the object's mask, stretched to a 32x32 box, with the six shapes'
   templates (rendered by :mod:`research.toy.scenes`, stretched likewise, sharp and at two blur levels);
4. colour = hue (or low saturation: white) of the object's bright pixels, after subtracting the background's tint
   (its deviation from neutral grey: the world's backgrounds are neutral);
5. texture = share of the object's pixels darker than 0.75 of its bright level (plain if few) and whether the dark
   pixels come in whole rows (striped) or not (dotted).

:func:`score_image` matches the objects a prompt asks for with the judged ones (object-level and image-level
binding accuracy) and :func:`classify_errors` says what kind of mistake an image makes (wrong count, missing shape,
an attribute leaked from another prompted object or from nowhere); :func:`judge_accuracy` measures the judge
itself on rendered, optionally perturbed scenes.
"""

from __future__ import annotations

import colorsys
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from research.toy.scenes import COLOURS, SHAPES, ObjectSpec, SceneBatch, render, sample_scenes, shape_inside

TEMPLATE_SIZE = 32
_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in COLOURS.items() if name != "white"}


@dataclass
class JudgedObject:
    """One object found by the judge.

    Attributes:
        shape, colour, texture: names from :data:`SHAPES`, :data:`COLOURS`, :data:`TEXTURES`.
        mask: (H, W) bool region of the object.
        bbox: (y0, x0, y1, x1), end exclusive.
        shape_iou: best template IoU (confidence of the shape).
        rgb: the object's colour after background correction.
        dark_fraction: share of the object's pixels darker than its bright level (0 for plain objects).
        row_persistence: how often a dark pixel has a dark pixel 4-5 pixels to its right (1 for stripes, low for
            dots).
    """

    shape: str
    colour: str
    texture: str
    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    shape_iou: float
    rgb: tuple[float, float, float]
    dark_fraction: float
    row_persistence: float

    @property
    def spec(self) -> ObjectSpec:
        return ObjectSpec(self.shape, self.colour, self.texture)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def _as_float_image(image) -> np.ndarray:
    """PIL image, uint8 or float array (H, W, 3), or a (3, H, W) tensor in [0, 1] to float (H, W, 3) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().float().cpu().numpy()
        if arr.ndim == 3 and arr.shape[0] == 3:
            arr = arr.transpose(1, 2, 0)
        return np.clip(arr, 0.0, 1.0)
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _box_sum3(m: np.ndarray) -> np.ndarray:
    p = np.pad(m.astype(np.int16), 1)
    h, w = m.shape
    return sum(p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))


def _erode(m: np.ndarray, r: int = 1) -> np.ndarray:
    for _ in range(r):
        m = _box_sum3(m) == 9
    return m


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool mask: labels (0 = background, 1..n) and n. Pure numpy (min propagation)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = lab
        for dy in range(3):
            for dx in range(3):
                nb = np.minimum(nb, p[dy : dy + h, dx : dx + w])
        nb = np.where(mask, nb, big)
        # pointer jumping: follow labels to their own label's label
        flat = nb.ravel()
        idx = np.where(flat < big, flat - 1, 0)
        jumped = np.where(flat < big, np.minimum(flat, nb.ravel()[idx]), big).reshape(h, w)
        if np.array_equal(jumped, lab):
            break
        lab = jumped
    uniq = np.unique(lab[mask])
    remap = np.zeros(big + 1, dtype=np.int32)
    remap[uniq] = np.arange(1, len(uniq) + 1)
    return np.where(mask, remap[np.minimum(lab, big)], 0), len(uniq)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the border."""
    lab, n = label_components(~mask)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    holes = (lab > 0) & ~np.isin(lab, border)
    return mask | holes


def _stretch(mask: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """A crop of a mask, resampled to ``size`` x ``size`` (area average) as floats."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area" if min(mask.shape) >= size else "bilinear")[0, 0].numpy()


#: Blur levels of the shape templates (Gaussian sigma as a fraction of the bounding box): generated images are soft,
#: which rounds corners and fills a star's inner vertices; each shape matches its best-fitting blur level.
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.05, 0.1)


@lru_cache(maxsize=1)
def shape_templates() -> np.ndarray:
    """(len(TEMPLATE_BLURS), 6, 32, 32) float masks of :data:`SHAPES`, each stretched from its tight bounding box."""
    n = 256
    c = (torch.arange(n) + 0.5) / n * 2.4 - 1.2
    v, u = torch.meshgrid(c, c, indexing="ij")
    out = []
    for blur in TEMPLATE_BLURS:
        level = []
        for i in range(len(SHAPES)):
            m = shape_inside(torch.tensor(i), u, v).float()
            if blur > 0:
                sigma = blur * n / 2.4 * 2  # fraction of the [-1, 1] box, in pixels of this grid
                r = int(3 * sigma)
                x = torch.arange(-r, r + 1, dtype=torch.float32)
                k = torch.exp(-(x**2) / (2 * sigma**2))
                k = k / k.sum()
                m = F.conv2d(m[None, None], k.view(1, 1, 1, -1), padding=(0, r))
                m = F.conv2d(m, k.view(1, 1, -1, 1), padding=(r, 0))[0, 0]
            m = (m > 0.5).numpy()
            ys, xs = np.nonzero(m)
            level.append(_stretch(m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
        out.append(np.stack(level))
    return np.stack(out)


def _row_persistence(dark: np.ndarray, inside: np.ndarray, width: int) -> float:
    """P(dark at x + lag | dark at x, both inside), averaged over lags of 4 and 5 pixels at width 128."""
    num, den = 0.0, 0.0
    for lag in {max(1, round(4 * width / 128)), max(1, round(5 * width / 128))}:
        both = inside[:, :-lag] & inside[:, lag:] & dark[:, :-lag]
        num += float((both & dark[:, lag:]).sum())
        den += float(both.sum())
    return num / den if den else 0.0


def _classify_colour(rgb: np.ndarray, white_saturation: float = 0.3) -> str:
    h, s, v = colorsys.rgb_to_hsv(*np.clip(rgb, 0, None) / max(float(rgb.max()), 1e-6))
    if s < white_saturation:
        return "white"
    hue = h * 360.0
    return min(_PALETTE_HUES, key=lambda k: min(abs(hue - _PALETTE_HUES[k]), 360 - abs(hue - _PALETTE_HUES[k])))


def judge(
    image, fg_threshold: float = 0.12, min_area: int = 40, dark_ratio: float = 0.75, plain_max_dark: float = 0.12
) -> list[JudgedObject]:
    """The objects of an image (PIL, (H, W, 3) array or (3, H, W) tensor), largest first.

    Args:
        image: the image; any size (thresholds are in pixels of a 128 x 128 image and scale with it).
        fg_threshold: RGB distance from the background above which a pixel is foreground.
        min_area: smallest object, in pixels at 128 x 128.
        dark_ratio: a pixel is textured-dark below this fraction of the object's bright level.
        plain_max_dark: objects with at most this share of dark pixels are plain.
    """
    img = _as_float_image(image)
    h, w, _ = img.shape
    scale = (h * w) / (128 * 128)
    border = np.concatenate(
        [img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3), img[:, -3:].reshape(-1, 3)]
    )
    bg = np.median(border, axis=0)
    tint = bg - bg.mean()
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    fg = dist > fg_threshold
    fg = _box_sum3(fg) >= 5
    fg = _fill_holes(fg)
    lab, n = label_components(fg)
    templates = shape_templates()
    corrected = img - tint
    objects = []
    for k in range(1, n + 1):
        m = lab == k
        if m.sum() < min_area * scale:
            continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = _stretch(m[y0:y1, x0:x1]) > 0.5
        inter = (templates > 0.5) & crop
        union = (templates > 0.5) | crop
        ious = (inter.sum((-1, -2)) / np.maximum(union.sum((-1, -2)), 1)).max(axis=0)
        shape = SHAPES[int(ious.argmax())]
        # the object's inside, away from its blurred rim: 2 pixels in (at 128 x 128) where enough is left
        inner = m
        for r in (max(1, round(2 * w / 128)), 1):
            if _erode(m, r).sum() >= 0.25 * m.sum():
                inner = _erode(m, r)
                break
        px = corrected[inner]
        val = px.max(axis=1)
        bright_level = np.percentile(val, 90)
        bright = px[val >= 0.8 * bright_level]
        rgb = np.median(bright, axis=0)
        colour = _classify_colour(rgb)
        dark = val < dark_ratio * bright_level
        dark_fraction = float(dark.mean())
        dark_img = np.zeros_like(m)
        dark_img[inner] = dark
        row_run = _row_persistence(dark_img, inner, w)
        if dark_fraction <= plain_max_dark:
            texture = "plain"
        else:
            texture = "striped" if row_run > 0.55 else "dotted"
        objects.append(
            JudgedObject(
                shape,
                colour,
                texture,
                m,
                (int(y0), int(x0), int(y1), int(x1)),
                float(ious.max()),
                tuple(float(c) for c in rgb),
                dark_fraction,
                row_run,
            )
        )
    objects.sort(key=lambda o: -o.area)
    return objects


def match_objects(
    expected: Sequence[ObjectSpec], seen: Sequence[JudgedObject], attributes=("shape", "colour", "texture")
):
    """Best one-to-one assignment of expected objects to judged ones; returns per-expected matched flags.

    An expected object counts as found when some judged object (used once) agrees on every named attribute.
    """
    n, m = len(expected), len(seen)
    ok = np.array(
        [[all(getattr(e, a) == getattr(s, a) for a in attributes) for s in seen] for e in expected], dtype=bool
    ).reshape(n, m)
    best = np.zeros(n, dtype=bool)
    if m == 0:
        return best
    for perm in itertools.permutations(range(max(m, n)), n):
        flags = np.array([perm[i] < m and ok[i, perm[i]] for i in range(n)])
        if flags.sum() > best.sum():
            best = flags
            if best.all():
                break
    return best


#: The kinds of failure :func:`classify_errors` counts, per prompted object (in the order the results list them).
OBJECT_ERRORS: tuple[str, ...] = ("shape_missing", "colour_leak", "colour_other", "texture_leak", "texture_other")


def assign_objects(expected: Sequence[ObjectSpec], seen: Sequence) -> list[int | None]:
    """One-to-one assignment of prompted objects to judged objects of the same shape (``None``: none assigned).

    Among all assignments (each judged object used at most once, only to a prompted object of its shape) it takes
    the one that maximises, in this order: the number of exact matches (shape, colour and texture: as many as
    :func:`match_objects` finds), the number of prompted objects assigned at all, the number whose colour agrees,
    the number whose texture agrees. Ties go to the first assignment in ``itertools.product`` order over each
    prompted object's candidates in judged order, so the result is deterministic. ``seen`` holds anything with
    ``shape``, ``colour`` and ``texture`` (:class:`JudgedObject`, :class:`ObjectSpec`).
    """
    cands = [[j for j, s in enumerate(seen) if s.shape == e.shape] for e in expected]

    def score(choice: tuple[int | None, ...]) -> tuple[int, int, int, int]:
        pairs = [(expected[i], seen[j]) for i, j in enumerate(choice) if j is not None]
        colour = sum(e.colour == s.colour for e, s in pairs)
        texture = sum(e.texture == s.texture for e, s in pairs)
        exact = sum(e.colour == s.colour and e.texture == s.texture for e, s in pairs)
        return exact, len(pairs), colour, texture

    best: list[int | None] = [None] * len(expected)
    best_score = (-1, -1, -1, -1)
    for choice in itertools.product(*[[*c, None] for c in cands]):
        used = [j for j in choice if j is not None]
        if len(used) != len(set(used)):
            continue
        sc = score(choice)
        if sc > best_score:
            best, best_score = list(choice), sc
    return best


def classify_errors(expected: Sequence[ObjectSpec], seen: Sequence) -> dict[str, int | bool]:
    """The kinds of mistake in one image: which prompted objects are wrong, and how.

    ``expected`` are the prompted objects, ``seen`` the judged ones (:class:`JudgedObject`, or anything with
    ``shape``, ``colour`` and ``texture``, e.g. :class:`ObjectSpec`). Prompted objects are assigned one-to-one to
    judged objects of their shape by :func:`assign_objects` (exact matches first, then as many of the rest as
    possible, preferring agreeing colour, then texture). Then:

    - ``not_found``: prompted objects without an exact match (shape, colour and texture) = ``len(expected)`` minus
      the number :func:`match_objects` finds;
    - ``shape_missing``: prompted objects not found to which no judged object of their shape is left;
    - every other prompted object not found has a candidate of its shape whose colour and/or texture is wrong:
      ``colour_leak`` if its colour is wrong and is the colour of another prompted object (an attribute taken from
      another subject: the semantic overflow / attribute mismatch Detail++ targets), else ``colour_other``;
      ``texture_leak`` if its texture is wrong, not ``plain`` and is the texture of another prompted object (a
      texture word of the prompt on the wrong subject), else ``texture_other`` (a texture from nowhere in the
      prompt, or a prompted texture lost to ``plain``). An object with both colour and texture wrong counts in one
      colour and one texture category, so ``not_found = shape_missing + objects with a wrong attribute`` and each
      of those counts at least once in ``colour_*`` / ``texture_*``;
    - ``count`` (bool): the number of judged objects differs from the number prompted; ``extra`` and ``missing``
      are the differences (``max(0, n_seen - n_expected)`` and ``max(0, n_expected - n_seen)``);
    - ``failed`` (bool): not image-correct (some prompted object not found, or a wrong count), the negation of
      :func:`score_image`'s ``image_correct``;
    - ``attributes_only`` (bool): failed, with the right count and no ``shape_missing``: the right objects, some
      with a wrong colour or texture. Detail++ keeps plain sampling's layout (branch 0's), so these are the most it
      could fix by injecting each subject's attributes;
    - ``binding_only`` (bool): ``attributes_only`` with no ``colour_other`` or ``texture_other``: every wrong object
      has only leaked attributes (so at least one leak): the attribute mismatch / overflow Detail++ is for.

    A correct image has every count 0 and every flag ``False``. Pure and deterministic.
    """
    assignment = assign_objects(expected, seen)
    out: dict[str, int | bool] = {k: 0 for k in ("not_found", *OBJECT_ERRORS)}
    for i, (e, j) in enumerate(zip(expected, assignment, strict=True)):
        s = seen[j] if j is not None else None
        if s is not None and s.colour == e.colour and s.texture == e.texture:
            continue
        out["not_found"] += 1
        if s is None:
            out["shape_missing"] += 1
            continue
        others = [o for k, o in enumerate(expected) if k != i]
        if s.colour != e.colour:
            out["colour_leak" if any(o.colour == s.colour for o in others) else "colour_other"] += 1
        if s.texture != e.texture:
            leak = s.texture != "plain" and any(o.texture == s.texture for o in others)
            out["texture_leak" if leak else "texture_other"] += 1
    n_seen, n_expected = len(seen), len(expected)
    count = n_seen != n_expected
    failed = count or out["not_found"] > 0
    out.update(
        count=count,
        extra=max(0, n_seen - n_expected),
        missing=max(0, n_expected - n_seen),
        failed=failed,
        attributes_only=failed and not count and out["shape_missing"] == 0,
        binding_only=failed and not count and out["shape_missing"] == out["colour_other"] == out["texture_other"] == 0,
    )
    return out


def score_image(image, expected: Sequence[ObjectSpec], **judge_kwargs) -> dict:
    """Binding scores of one image for the objects a prompt asks for.

    Returns ``{"found": [bool per expected object], "object_accuracy", "image_correct", "n_seen", "seen", "errors"}``:
    image-level correct means every expected object is found with all its attributes and nothing else is there
    (so no attribute sits on a wrong or extra object); ``errors`` is :func:`classify_errors` (what kind of mistake).
    """
    seen = judge(image, **judge_kwargs)
    found = match_objects(expected, seen)
    return {
        "found": found.tolist(),
        "object_accuracy": float(found.mean()) if len(found) else 1.0,
        "image_correct": bool(found.all() and len(seen) == len(expected)),
        "n_seen": len(seen),
        "seen": [o.spec for o in seen],
        "errors": classify_errors(expected, seen),
    }


# ----------------------------------------------------------------------------------------------------------------
# Perturbations that make renders look like generated images, and the judge's accuracy


def perturb(images: torch.Tensor, rng: np.random.Generator, strength: float = 1.0) -> torch.Tensor:
    """Colour drift (tint and gain), blur and noise, at random, on ``(B, 3, H, W)`` images in [0, 1]."""
    b = images.shape[0]
    dev, dt = images.device, images.dtype

    def t(a):
        return torch.as_tensor(a, device=dev, dtype=dt)

    gain = t(1.0 + strength * rng.uniform(-0.15, 0.1, size=(b, 3, 1, 1)))
    tint = t(strength * rng.uniform(-0.06, 0.06, size=(b, 3, 1, 1)))
    out = images * gain + tint
    sigma = strength * rng.uniform(0.3, 1.0)
    r = 3
    x = torch.arange(-r, r + 1, device=dev, dtype=dt)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    out = F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    out = out + t(strength * 0.03 * rng.standard_normal(size=tuple(images.shape)))
    return out.clamp(0, 1)


def judge_accuracy(
    n: int = 200,
    seed: int = 1234,
    split: str = "any",
    perturbed: bool = False,
    strength: float = 1.0,
    batch_size: int = 50,
    layout: str = "uniform",
) -> dict:
    """Accuracy of the judge on rendered scenes (optionally perturbed) of a layout (``sample_scenes``' ``layout``).

    Returns object accuracy (each ground-truth object matched by IoU > 0.5 with a judged object of the right shape,
    colour and texture), per-attribute accuracies, scene accuracy (all objects right, nothing extra) and mask IoU.
    """
    rng = np.random.default_rng(seed)
    tot = {
        "objects": 0,
        "correct": 0,
        "shape": 0,
        "colour": 0,
        "texture": 0,
        "detected": 0,
        "scenes": 0,
        "scenes_correct": 0,
        "iou_sum": 0.0,
    }
    errors: list[str] = []
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        batch: SceneBatch = sample_scenes(b, rng, split=split, layout=layout)
        images, masks = render(batch)
        if perturbed:
            images = perturb(images, rng, strength)
        for i in range(b):
            seen = judge(images[i])
            objs = batch.objects(i)
            all_ok = len(seen) == len(objs)
            for k, o in enumerate(objs):
                gt = masks[i, k].numpy()
                best, best_iou = None, 0.0
                for s in seen:
                    iou = (s.mask & gt).sum() / max((s.mask | gt).sum(), 1)
                    if iou > best_iou:
                        best, best_iou = s, iou
                tot["objects"] += 1
                if best is None or best_iou <= 0.5:
                    all_ok = False
                    errors.append(f"missed {o}")
                    continue
                tot["detected"] += 1
                tot["iou_sum"] += best_iou
                ok = [best.shape == o.shape, best.colour == o.colour, best.texture == o.texture]
                tot["shape"] += ok[0]
                tot["colour"] += ok[1]
                tot["texture"] += ok[2]
                if all(ok):
                    tot["correct"] += 1
                else:
                    all_ok = False
                    errors.append(f"{o} read as {best.spec}")
            tot["scenes"] += 1
            tot["scenes_correct"] += all_ok
        done += b
    no = max(tot["objects"], 1)
    return {
        "n_scenes": tot["scenes"],
        "n_objects": tot["objects"],
        "object_accuracy": tot["correct"] / no,
        "scene_accuracy": tot["scenes_correct"] / max(tot["scenes"], 1),
        "detection": tot["detected"] / no,
        "shape": tot["shape"] / no,
        "colour": tot["colour"] / no,
        "texture": tot["texture"] / no,
        "mask_iou": tot["iou_sum"] / max(tot["detected"], 1),
        "perturbed": perturbed,
        "errors": errors[:20],
    }
