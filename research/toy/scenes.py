"""The toy world: seeded synthetic scenes of one to three coloured, textured shapes, with captions and masks.

A scene is sampled on the CPU (numpy, vectorised) as a :class:`SceneBatch` of attribute arrays and captions, then
rendered by :func:`render` with torch on any device (the GPU during training, so data never waits).

Rules of the world:

* 128 x 128 RGB images on a plain neutral-grey background (level 0.06-0.28), objects never overlap (their bounding
  boxes keep a 3-pixel margin), shapes keep a fixed upright orientation and a half-extent of 14-22 pixels.
* Each object has a shape (:data:`SHAPES`), a colour (:data:`COLOURS`) and a texture (:data:`TEXTURES`): striped
  objects have horizontal stripes and dotted objects a grid of dots, in the object's colour at half brightness.
* Captions name the objects in random order, ``[article] [texture] [colour] shape`` (no texture word for plain), and
  join them with one of a few templates ("a red circle and a blue square", "a striped yellow star next to a green
  triangle", "a red circle, a blue square and a white heart").
* Held-out binding split: the colour-shape pairs of :data:`HELD_OUT_PAIRS` never occur in a multi-object training
  scene (neither in its image nor in its caption). They do occur alone in single-object scenes, so the model knows
  how to draw each of them, and must bind them to the right object in a multi-object prompt on its own.
  :func:`held_out_prompts` lists multi-object prompts that contain at least one held-out pair.
* Training captions drop an object's colour or texture word with probability ``attribute_drop`` (default 0.15), so
  partial prompts such as "a circle and a blue square" (Detail++'s base and sub-prompts) are in distribution.
* Layout from the noise (``layout="field"`` or ``"slots"``): where the objects go is decided by the diffusion noise
  that the scene is trained with. The noise's mean over each cell of a :data:`LAYOUT_GRID` x :data:`LAYOUT_GRID` grid
  (all latent channels), standardised, is the scene's *layout field*. ``"field"`` places the objects greedily in
  caption order, each where the mean field under its box is highest among the free places (sizes and 4-px lattice
  positions vary); ``"slots"`` (what training uses since run 5) puts the k-th object named by the caption on the place
  of a 3 x 3 grid with the k-th highest mean field around it: a coarse, discrete rule, meant to be easier to learn.
  :func:`noise_with_layout_field` then draws the training noise with exactly that field, and the noise is still
  exactly N(0, I). A model trained so reads its layout off the initial noise, as SDXL largely does, so prompts that
  differ only in their modifiers (Detail++'s branches) share one layout when they share the noise; without it a
  small model's layout follows the text alone and the branches of one image disagree (measured in
  docs/toy-binding.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
#: Colour names and their RGB values in [0, 1]; hues are about 0, 30, 55, 125, 222 and 275 degrees.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.98, 0.92, 0.10),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.12, 0.35, 0.95),
    "purple": (0.60, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
#: Colour-shape pairs never shown in a multi-object training scene (one per colour, each shape at least once).
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("orange", "cross"),
    ("yellow", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("purple", "heart"),
    ("white", "star"),
)
#: Templates joining the object phrases of 1, 2 and 3 objects.
TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("{0}",),
    2: ("{0} and {1}", "{0} next to {1}", "{0} beside {1}", "{0} with {1}"),
    3: ("{0}, {1} and {2}", "{0} next to {1} and {2}", "{0} and {1} and {2}"),
}

IMAGE_SIZE = 128
MAX_OBJECTS = 3
SIZE_RANGE = (14.0, 22.0)  # half-extent of an object's bounding box, pixels at IMAGE_SIZE
BACKGROUND_RANGE = (0.06, 0.28)  # neutral grey level of the background
MARGIN = 3.0  # pixels kept free between bounding boxes and from the border
TEXTURE_SHADE = 0.5  # brightness of the stripes / dots relative to the object's colour
STRIPE_PERIOD = 8.0  # pixels at IMAGE_SIZE (half dark, half light)
DOT_SPACING = 9.0
DOT_RADIUS = 2.4
LAYOUT_GRID = 8  # cells per side of the noise's layout field (8 x 8 latent pixels = 16 x 16 image pixels each)
LAYOUT_STEP = 4.0  # pixels between the lattice points an object's centre may take when placed on the field
#: Centres (pixels, both axes) of the 3 x 3 places of the ``"slots"`` layout, 40 px apart.
SLOT_CENTRES = (24.0, 64.0, 104.0)
SLOT_SIZE_RANGE = (14.0, 18.5)  # half-extents in the slots layout: neighbours keep MARGIN, borders 5.5 px
SLOT_REACH = 16.0  # half-side of the square of the layout field a place reads (32 x 32 pixels around its centre)
LAYOUTS = ("uniform", "field", "slots")
N_OBJECTS_P = (0.2, 0.45, 0.35)  # probabilities of 1, 2 and 3 objects in training scenes
TEXTURE_P = (0.5, 0.25, 0.25)

_HELD_OUT = np.zeros((len(COLOUR_NAMES), len(SHAPES)), dtype=bool)
for _c, _s in HELD_OUT_PAIRS:
    _HELD_OUT[COLOUR_NAMES.index(_c), SHAPES.index(_s)] = True


def is_held_out_pair(colour: str | int, shape: str | int) -> bool:
    """Whether a colour-shape pair is held out of multi-object training scenes."""
    c = COLOUR_NAMES.index(colour) if isinstance(colour, str) else int(colour)
    s = SHAPES.index(shape) if isinstance(shape, str) else int(shape)
    return bool(_HELD_OUT[c, s])


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a prompt: its shape, colour and texture names."""

    shape: str
    colour: str
    texture: str = "plain"

    def phrase(self, say_colour: bool = True, say_texture: bool = True) -> str:
        """``"a striped red circle"``; ``"an orange star"``; the texture word is never said for plain objects."""
        words = []
        if say_texture and self.texture != "plain":
            words.append(self.texture)
        if say_colour:
            words.append(self.colour)
        words.append(self.shape)
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words])

    @property
    def held_out(self) -> bool:
        return is_held_out_pair(self.colour, self.shape)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and the objects it asks for, in the order of the prompt."""

    prompt: str
    objects: tuple[ObjectSpec, ...]

    @property
    def held_out(self) -> bool:
        return len(self.objects) > 1 and any(o.held_out for o in self.objects)


def compose_caption(objects: Sequence[ObjectSpec], template: int = 0, say_colour=None, say_texture=None) -> str:
    """Join the objects' phrases with template number ``template`` of :data:`TEMPLATES` for their count."""
    n = len(objects)
    say_colour = [True] * n if say_colour is None else say_colour
    say_texture = [True] * n if say_texture is None else say_texture
    phrases = [o.phrase(bool(c), bool(t)) for o, c, t in zip(objects, say_colour, say_texture, strict=True)]
    templates = TEMPLATES[n]
    return templates[template % len(templates)].format(*phrases)


@dataclass
class SceneBatch:
    """A batch of scenes (numpy arrays; object slots beyond ``n_objects`` hold -1 / 0).

    Attributes:
        n_objects: (B,) number of objects, 1-3.
        shape, colour, texture: (B, 3) indices into :data:`SHAPES`, :data:`COLOUR_NAMES`, :data:`TEXTURES`
            (-1 if absent).
        cx, cy, size: (B, 3) centre and half-extent in pixels at :data:`IMAGE_SIZE` (renders at other sizes scale).
        phase: (B, 3) texture phase offsets in pixels.
        background: (B,) grey level of the background.
        order: (B, 3) object slot named first, second and third by the caption (-1 if absent).
        say_colour, say_texture: (B, 3) whether the caption names the slot's colour / texture.
        captions: the captions.
        layout_field: (B, G, G) the standardised noise cell means the layout was chosen from, or None.
    """

    n_objects: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    texture: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    size: np.ndarray
    phase: np.ndarray
    background: np.ndarray
    order: np.ndarray
    say_colour: np.ndarray
    say_texture: np.ndarray
    captions: list[str] = field(default_factory=list)
    layout_field: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.n_objects)

    def objects(self, i: int) -> list[ObjectSpec]:
        """Scene ``i``'s objects, in slot order (the order of the masks)."""
        return [
            ObjectSpec(SHAPES[self.shape[i, k]], COLOUR_NAMES[self.colour[i, k]], TEXTURES[self.texture[i, k]])
            for k in range(int(self.n_objects[i]))
        ]

    def prompt_spec(self, i: int) -> PromptSpec:
        """Scene ``i``'s caption with its objects in caption order."""
        objs = self.objects(i)
        return PromptSpec(self.captions[i], tuple(objs[k] for k in self.order[i, : self.n_objects[i]]))


def _place(rng: np.random.Generator, n_objects: np.ndarray, tries: int = 48):
    """Non-overlapping centres and half-extents for each scene (vectorised rejection sampling)."""
    b = len(n_objects)
    scale = 1.0
    image_size = IMAGE_SIZE
    cx = np.zeros((b, MAX_OBJECTS))
    cy = np.zeros((b, MAX_OBJECTS))
    size = np.zeros((b, MAX_OBJECTS))
    todo = np.arange(b)
    present = np.arange(MAX_OBJECTS)[None, :] < n_objects[:, None]
    while len(todo):
        m = len(todo)
        s = rng.uniform(*SIZE_RANGE, size=(m, tries, MAX_OBJECTS)) * scale
        lo = s + MARGIN * scale
        x = lo + rng.random((m, tries, MAX_OBJECTS)) * (image_size - 2 * lo)
        y = lo + rng.random((m, tries, MAX_OBJECTS)) * (image_size - 2 * lo)
        gap = s[..., :, None] + s[..., None, :] + MARGIN * scale
        apart = (np.abs(x[..., :, None] - x[..., None, :]) > gap) | (np.abs(y[..., :, None] - y[..., None, :]) > gap)
        both = present[todo][:, None, :, None] & present[todo][:, None, None, :]
        eye = np.eye(MAX_OBJECTS, dtype=bool)
        ok = (apart | ~both | eye).all(axis=(-1, -2))  # (m, tries)
        found = ok.any(axis=1)
        first = ok.argmax(axis=1)
        idx = todo[found]
        sel = first[found]
        cx[idx] = x[found, sel]
        cy[idx] = y[found, sel]
        size[idx] = s[found, sel]
        todo = todo[~found]
    cx[~present] = 0
    cy[~present] = 0
    size[~present] = 0
    return cx, cy, size


def _box_means(field: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Mean of each scene's layout field (B, G, G) over square boxes (B, N) given in pixels at :data:`IMAGE_SIZE`.

    The field is constant on each cell, so a box's integral is its overlap with each cell column times its overlap
    with each cell row, weighted by the cell values: two small batched products.
    """
    g = field.shape[-1]
    edges = np.arange(g + 1) * (IMAGE_SIZE / g)
    cx, cy, size = np.broadcast_arrays(cx, cy, size)

    def overlap(c: np.ndarray) -> np.ndarray:  # (B, N) -> (B, N, G) lengths inside each cell
        lo, hi = (c - size)[..., None], (c + size)[..., None]
        return np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0, None)

    ox, oy = overlap(cx), overlap(cy)
    total = (np.matmul(oy, field) * ox).sum(-1)  # sum_j oy[j] sum_i field[j, i] ox[i]
    return total / np.maximum(ox.sum(-1) * oy.sum(-1), 1e-9)


def _place_on_field(
    rng: np.random.Generator, n_objects: np.ndarray, order: np.ndarray, layout_field: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place the objects greedily in caption order, each where the field under its box is highest.

    Sizes are drawn at random; centres lie on a :data:`LAYOUT_STEP`-pixel lattice. Each object takes the lattice
    point whose box (inside the image, clear of the objects already placed) has the highest mean field. A scene
    whose next object finds no free place is drawn again with new sizes (rare; the smallest size always fits).
    """
    b = len(n_objects)
    cx = np.zeros((b, MAX_OBJECTS))
    cy = np.zeros((b, MAX_OBJECTS))
    size = np.zeros((b, MAX_OBJECTS))
    reach = SIZE_RANGE[0] + MARGIN  # no centre closer to the border fits
    lattice = np.arange(reach, IMAGE_SIZE - reach + 1e-9, LAYOUT_STEP)
    gx, gy = (a.ravel() for a in np.meshgrid(lattice, lattice))
    todo = np.arange(b)
    for attempt in range(8):
        m = len(todo)
        s = rng.uniform(*SIZE_RANGE, size=(m, MAX_OBJECTS))
        if attempt == 7:
            s[:] = SIZE_RANGE[0]
        px = np.zeros((m, MAX_OBJECTS))
        py = np.zeros((m, MAX_OBJECTS))
        failed = np.zeros(m, dtype=bool)
        for k in range(MAX_OBJECTS):
            slot = order[todo, k]
            rows = np.flatnonzero(slot >= 0)
            if not len(rows):
                break
            sk = s[rows, slot[rows]][:, None]
            ok = (gx[None] >= sk + MARGIN) & (gx[None] <= IMAGE_SIZE - sk - MARGIN)
            ok &= (gy[None] >= sk + MARGIN) & (gy[None] <= IMAGE_SIZE - sk - MARGIN)
            for j in range(k):  # clear of the objects placed before
                prev = order[todo[rows], j]
                sj = s[rows, prev][:, None]
                gap = sk + sj + MARGIN
                ok &= (np.abs(gx[None] - px[rows, prev][:, None]) > gap) | (
                    np.abs(gy[None] - py[rows, prev][:, None]) > gap
                )
            score = _box_means(layout_field[todo[rows]], gx[None], gy[None], sk)
            score = np.where(ok, score, -np.inf)
            pick = score.argmax(axis=1)
            failed[rows] |= ~ok[np.arange(len(rows)), pick]
            px[rows, slot[rows]] = gx[pick]
            py[rows, slot[rows]] = gy[pick]
        done = ~failed
        cx[todo[done]], cy[todo[done]], size[todo[done]] = px[done], py[done], s[done]
        todo = todo[failed]
        if not len(todo):
            break
    if len(todo):
        raise RuntimeError(f"{len(todo)} scenes found no free place for their objects")
    present = np.arange(MAX_OBJECTS)[None, :] < n_objects[:, None]
    cx[~present] = 0
    cy[~present] = 0
    size[~present] = 0
    return cx, cy, size


def slot_scores(layout_field: np.ndarray) -> np.ndarray:
    """(B, 9) mean layout field around each place of the ``"slots"`` layout (row-major over :data:`SLOT_CENTRES`)."""
    gy, gx = (a.ravel() for a in np.meshgrid(SLOT_CENTRES, SLOT_CENTRES, indexing="ij"))
    b = len(layout_field)
    return _box_means(layout_field, np.broadcast_to(gx, (b, 9)), np.broadcast_to(gy, (b, 9)), SLOT_REACH)


def _place_on_slots(
    rng: np.random.Generator, n_objects: np.ndarray, order: np.ndarray, layout_field: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``"slots"`` layout: the k-th object named by the caption sits on the place with the k-th highest score.

    Places are the 3 x 3 grid of :data:`SLOT_CENTRES`; a place's score is the layout field's mean over the 32 x 32
    pixels around it (:func:`slot_scores`); sizes are random in :data:`SLOT_SIZE_RANGE`, so objects never overlap.
    A coarse, discrete rule: a model learns it from the noise far more easily than :func:`_place_on_field`'s.
    """
    b = len(n_objects)
    rank = np.argsort(-slot_scores(layout_field), axis=1, kind="stable")  # (B, 9) places, best first
    centres = np.asarray(SLOT_CENTRES)
    cx = np.zeros((b, MAX_OBJECTS))
    cy = np.zeros((b, MAX_OBJECTS))
    size = rng.uniform(*SLOT_SIZE_RANGE, size=(b, MAX_OBJECTS))
    rows = np.arange(b)
    for k in range(MAX_OBJECTS):
        slot = order[:, k]
        has = slot >= 0
        place = rank[:, k]
        cx[rows[has], slot[has]] = centres[place[has] % 3]
        cy[rows[has], slot[has]] = centres[place[has] // 3]
    present = np.arange(MAX_OBJECTS)[None, :] < n_objects[:, None]
    size[~present] = 0
    return cx, cy, size


def layout_field_of(noise: torch.Tensor, grid: int = LAYOUT_GRID) -> torch.Tensor:
    """The standardised mean of latent noise (B, C, H, W) over each cell of a ``grid`` x ``grid`` grid: (B, G, G).

    For N(0, I) noise every cell mean is N(0, 1 / cell size); standardised, the field is N(0, I) too.
    """
    b, c, h, w = noise.shape
    if h % grid or w % grid:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the layout grid {grid}")
    cell = c * (h // grid) * (w // grid)
    return F.avg_pool2d(noise.float().mean(1, keepdim=True), (h // grid, w // grid))[:, 0] * math.sqrt(cell)


def noise_with_layout_field(
    layout_field: torch.Tensor | np.ndarray,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """N(0, I) noise of ``shape`` (B, C, H, W) whose :func:`layout_field_of` equals ``layout_field`` (B, G, G).

    Gaussian noise is its cell means plus residuals independent of them, so replacing the cell means by the given
    (standard normal) field leaves the noise exactly N(0, I) while fixing the field the scene's layout came from.
    """
    field = torch.as_tensor(layout_field, dtype=torch.float32, device=device)
    b, c, h, w = shape
    grid = field.shape[-1]
    noise = torch.randn(tuple(shape), generator=generator, device=device)
    cell = c * (h // grid) * (w // grid)
    delta = field[:, None] / math.sqrt(cell) - F.avg_pool2d(noise.mean(1, keepdim=True), (h // grid, w // grid))
    return noise + F.interpolate(delta, scale_factor=(h // grid, w // grid), mode="nearest")


def sample_scenes(
    n: int,
    rng: np.random.Generator | int | None = None,
    split: str = "train",
    n_objects: int | Sequence[float] | None = None,
    attribute_drop: float = 0.0,
    layout: str = "uniform",
    layout_field: np.ndarray | None = None,
) -> SceneBatch:
    """Sample ``n`` scenes.

    Args:
        n: number of scenes.
        rng: a numpy generator or a seed.
        split: ``"train"`` (multi-object scenes avoid :data:`HELD_OUT_PAIRS`), ``"held_out"`` (multi-object scenes with
            at least one held-out pair) or ``"any"`` (no constraint).
        n_objects: a fixed object count, or probabilities of 1, 2, 3 objects (default :data:`N_OBJECTS_P`; for
            ``"held_out"`` 2 or 3 objects, equally likely).
        attribute_drop: probability of leaving an object's colour word (and, independently, its texture word) out of
            the caption.
        layout: ``"uniform"`` (anywhere, without overlap), ``"field"`` (greedily where the layout field is highest)
            or ``"slots"`` (on a 3 x 3 grid of places ranked by the field); see the module's docstring. The field
            (drawn from ``rng``, standard normal, unless ``layout_field`` is given) is kept in
            :attr:`SceneBatch.layout_field` for :func:`noise_with_layout_field`.
        layout_field: (n, G, G) the field to place the objects on (with ``layout="uniform"``, means ``"field"``).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if split not in ("train", "held_out", "any"):
        raise ValueError(f"split must be 'train', 'held_out' or 'any', not {split!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if layout_field is not None and layout == "uniform":
        layout = "field"
    if isinstance(n_objects, int):
        counts = np.full(n, n_objects)
    else:
        p = np.asarray(n_objects if n_objects is not None else ((0, 0.5, 0.5) if split == "held_out" else N_OBJECTS_P))
        counts = rng.choice(np.arange(1, MAX_OBJECTS + 1), size=n, p=p / p.sum())
    if split == "held_out" and (counts < 2).any():
        raise ValueError("held-out scenes have 2 or 3 objects")
    present = np.arange(MAX_OBJECTS)[None, :] < counts[:, None]
    shape = rng.integers(0, len(SHAPES), size=(n, MAX_OBJECTS))
    colour = rng.integers(0, len(COLOUR_NAMES), size=(n, MAX_OBJECTS))
    if split == "train":  # redraw held-out pairs of multi-object scenes until none is left
        bad = _HELD_OUT[colour, shape] & present & (counts[:, None] > 1)
        while bad.any():
            colour[bad] = rng.integers(0, len(COLOUR_NAMES), size=int(bad.sum()))
            shape[bad] = rng.integers(0, len(SHAPES), size=int(bad.sum()))
            bad = _HELD_OUT[colour, shape] & present & (counts[:, None] > 1)
    elif split == "held_out":  # force a held-out pair into one random slot of each scene
        pairs = np.argwhere(_HELD_OUT)
        pick = pairs[rng.integers(0, len(pairs), size=n)]
        slot = (rng.random(n) * counts).astype(int)
        colour[np.arange(n), slot] = pick[:, 0]
        shape[np.arange(n), slot] = pick[:, 1]
    texture = rng.choice(len(TEXTURES), size=(n, MAX_OBJECTS), p=np.asarray(TEXTURE_P))
    shape[~present] = -1
    colour[~present] = -1
    texture[~present] = -1
    noise_layout = layout != "uniform"
    if not noise_layout:  # the uniform layout draws here, before the rest (keeps earlier prompt lists unchanged)
        cx, cy, size = _place(rng, counts)
    phase = rng.uniform(0, STRIPE_PERIOD, size=(n, MAX_OBJECTS))
    background = rng.uniform(*BACKGROUND_RANGE, size=n)
    keys = np.where(present, rng.random((n, MAX_OBJECTS)), 2.0)
    order = np.argsort(keys, axis=1)
    order[~present] = -1
    if noise_layout:
        if layout_field is None:
            layout_field = rng.standard_normal((n, LAYOUT_GRID, LAYOUT_GRID))
        layout_field = np.asarray(layout_field, dtype=np.float64)
        if layout_field.shape[0] != n or layout_field.ndim != 3 or IMAGE_SIZE % layout_field.shape[-1]:
            raise ValueError(f"layout_field must have shape ({n}, G, G) with G dividing {IMAGE_SIZE}")
        place = _place_on_slots if layout == "slots" else _place_on_field
        cx, cy, size = place(rng, counts, order, layout_field)
    say_colour = rng.random((n, MAX_OBJECTS)) >= attribute_drop
    say_texture = rng.random((n, MAX_OBJECTS)) >= attribute_drop
    template = rng.integers(0, 1 << 30, size=n)
    batch = SceneBatch(counts, shape, colour, texture, cx, cy, size, phase, background, order, say_colour, say_texture)
    batch.layout_field = layout_field.astype(np.float32) if noise_layout else None
    captions = []
    for i in range(n):
        objs = batch.objects(i)
        slots = order[i, : counts[i]]
        captions.append(
            compose_caption([objs[k] for k in slots], int(template[i]), say_colour[i, slots], say_texture[i, slots])
        )
    batch.captions = captions
    return batch


def held_out_prompts(n: int = 256, seed: int = 0, n_objects: Sequence[int] = (2, 3)) -> list[PromptSpec]:
    """``n`` distinct multi-object prompts containing at least one held-out colour-shape pair.

    Deterministic for a seed, and a shorter list is a prefix of a longer one.
    """
    return _distinct_prompts(n, seed, "held_out", n_objects)


def seen_prompts(n: int = 256, seed: int = 0, n_objects: Sequence[int] = (2, 3)) -> list[PromptSpec]:
    """``n`` distinct multi-object prompts whose colour-shape pairs all occur in training scenes (deterministic)."""
    return _distinct_prompts(n, seed, "train", n_objects)


def _distinct_prompts(n: int, seed: int, split: str, n_objects: Sequence[int]) -> list[PromptSpec]:
    rng = np.random.default_rng(seed)
    p = np.zeros(MAX_OBJECTS)
    for k in n_objects:
        p[k - 1] = 1.0
    out: dict[str, PromptSpec] = {}
    for _ in range(100):
        batch = sample_scenes(256, rng, split=split, n_objects=p)  # fixed chunks: a shorter list is a prefix
        for i in range(len(batch)):
            spec = batch.prompt_spec(i)
            out.setdefault(spec.prompt, spec)
            if len(out) == n:
                return list(out.values())
    raise ValueError(f"could not find {n} distinct prompts")


# ----------------------------------------------------------------------------------------------------------------
# Rendering (torch; any device)


def shape_inside(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether normalised coordinates ``(u, v)`` (x right, y down, the bounding box is [-1, 1]^2) lie in ``shape``.

    ``shape`` holds indices into :data:`SHAPES` and broadcasts against ``u`` and ``v``.
    """
    au, av = u.abs(), v.abs()
    circle = u * u + v * v <= 1.0
    square = (au <= 0.86) & (av <= 0.86)
    triangle = (v <= 0.8) & (au <= (v + 0.95) / 1.75)
    # five-pointed star, outer radius 1, inner radius 0.42, one point up
    r = torch.sqrt(u * u + v * v)
    theta = torch.atan2(u, -v)
    sector = 2 * math.pi / 5
    phi = torch.remainder(theta, sector) - sector / 2
    phi = phi.abs()  # 0 at an inner vertex direction ... sector/2 at an outer point
    px, py = r * torch.cos(sector / 2 - phi), r * torch.sin(sector / 2 - phi)  # frame: outer point on +x axis
    ix, iy = 0.42 * math.cos(sector / 2), 0.42 * math.sin(sector / 2)
    star = ((ix - 1.0) * py - iy * (px - 1.0) >= 0.0) & (r <= 1.0)
    # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up
    hx, hy = u * 1.18, -(v * 1.15) + 0.12
    q = hx * hx + hy * hy - 1.0
    heart = q * q * q - hx * hx * hy * hy * hy <= 0.0
    cross = ((au <= 0.3) & (av <= 0.9)) | ((av <= 0.3) & (au <= 0.9))
    masks = torch.stack(torch.broadcast_tensors(circle, square, triangle, star, heart, cross))
    idx = shape.clamp(min=0).long().expand_as(masks[0]).unsqueeze(0)
    return masks.gather(0, idx).squeeze(0) & (shape >= 0)


def render(
    batch: SceneBatch,
    device: torch.device | str = "cpu",
    image_size: int = IMAGE_SIZE,
    supersample: int = 2,
    dtype: torch.dtype = torch.float32,
    render_fn=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a batch: images ``(B, 3, H, W)`` in [0, 1] and per-slot masks ``(B, 3, H, W)`` (bool).

    Masks are the slots' pixels covered more than half (anti-aliased edges from ``supersample``^2 samples a pixel).
    ``render_fn`` replaces :func:`render_tensors` (a ``torch.compile``-d copy, say).
    """
    dev = torch.device(device)
    f = torch.as_tensor(np.stack([batch.cx, batch.cy, batch.size, batch.phase]), dtype=dtype).to(dev)
    idx = torch.as_tensor(np.stack([batch.shape, batch.colour, batch.texture])).to(dev)
    bg = torch.as_tensor(batch.background, dtype=dtype).to(dev)
    return (render_fn or render_tensors)(f, idx, bg, image_size, supersample)


def render_tensors(
    f: torch.Tensor, idx: torch.Tensor, background: torch.Tensor, image_size: int = IMAGE_SIZE, supersample: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor part of :func:`render`: ``f`` = (4, B, 3) centre x, y, half-extent, phase; ``idx`` = (3, B, 3)
    shape, colour, texture indices (-1 absent); ``background`` = (B,) grey levels."""
    dev, dtype = f.device, f.dtype
    b = f.shape[1]
    ss = image_size * supersample
    coords = (torch.arange(ss, device=dev, dtype=dtype) + 0.5) * (IMAGE_SIZE / ss)  # in IMAGE_SIZE pixel units
    yy = coords.view(1, 1, ss, 1)
    xx = coords.view(1, 1, 1, ss)
    cx, cy, size, phase = (f[i][..., None, None] for i in range(4))
    size = size.clamp(min=1e-3)
    u = (xx - cx) / size
    v = (yy - cy) / size
    shape = idx[0][..., None, None]
    inside = shape_inside(shape, u, v)  # (B, 3, ss, ss)
    # texture: dark stripes / dots at TEXTURE_SHADE of the colour
    stripes = torch.remainder(yy - cy + phase, STRIPE_PERIOD) < STRIPE_PERIOD / 2
    sp = DOT_SPACING
    dx = torch.remainder(xx - cx + sp / 2, sp) - sp / 2
    dy = torch.remainder(yy - cy + sp / 2, sp) - sp / 2
    dots = dx * dx + dy * dy <= DOT_RADIUS**2
    texture = idx[2][..., None, None]
    dark = ((texture == 1) & stripes) | ((texture == 2) & dots)
    palette = torch.tensor(list(COLOURS.values()), device=dev, dtype=dtype)
    colour = palette[idx[1].clamp(min=0)]  # (B, 3 slots, 3 rgb)
    shade = 1.0 - (1.0 - TEXTURE_SHADE) * dark.to(dtype)
    img = background.view(b, 1, 1, 1).expand(b, 3, ss, ss)
    for k_slot in range(MAX_OBJECTS):
        m = inside[:, k_slot : k_slot + 1]
        rgb = colour[:, k_slot, :, None, None] * shade[:, k_slot : k_slot + 1]
        img = torch.where(m, rgb, img)
    cover = inside.to(dtype)
    if supersample > 1:
        img = F.avg_pool2d(img, supersample)
        cover = F.avg_pool2d(cover, supersample)
    return img, cover > 0.5


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` floats in [0, 1] to ``(B, H, W, 3)`` uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class CaptionTokenizer:
    """Fast exact CLIP tokenization of toy captions: word ids cached from SDXL's CLIP tokenizer.

    Gives the same ids as ``tokenizer(caption, padding="max_length", max_length=77, truncation=True)``; the second
    tokenizer pads with ``"!"`` (id 0) instead of the end token.
    """

    def __init__(self, tokenizer=None) -> None:
        if tokenizer is None:
            from detailpp.resources import load_clip_tokenizer

            tokenizer = load_clip_tokenizer()
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.cache: dict[str, list[int]] = {}

    def _word(self, w: str) -> list[int]:
        ids = self.cache.get(w)
        if ids is None:
            ids = self.tokenizer(w, add_special_tokens=False).input_ids
            self.cache[w] = ids
        return ids

    def __call__(self, captions: Sequence[str], pad_id: int | None = None, max_length: int = 77) -> np.ndarray:
        pad = self.eos if pad_id is None else pad_id
        out = np.full((len(captions), max_length), pad, dtype=np.int64)
        for i, c in enumerate(captions):
            ids = [self.bos]
            for w in c.replace(",", " ,").split():
                ids.extend(self._word(w))
            ids = ids[: max_length - 1] + [self.eos]
            out[i, : len(ids)] = ids
        return out
