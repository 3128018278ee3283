"""The binding benchmark on the toy model: plain sampling, Detail++ and the paper's ablation, judged by the toy judge.

For every held-out 2-/3-object prompt of the run's split (:func:`split_prompts`: ``"test"``, the prompts the results
report, or ``"validation"``, disjoint from them, on which the toy's hyperparameters are chosen) and every seed, each
method makes one image from the same initial noise (one CPU generator per image, seeded with :func:`image_seed`):

- ``sdxl``: plain ``StableDiffusionXLPipeline.__call__`` on the same components;
- ``pdi``: Progressive Detail Injection alone (``DetailConfig(nursing=False)``);
- ``pdi_entropy``: PDI + attention nursing with the entropy loss only (``centroid_alignment=False``);
- ``detailpp``: the full method (nursing with entropy and centroid alignment; the defaults).

``Settings.detail_config`` (``--detail-config``) holds DetailConfig fields laid under every Detail++ method and
diagnostic setting: a method runs ``DetailConfig(**{**overlay, **its own fields})``, so its own fields win (``pdi``
keeps ``nursing=False``); plain ``sdxl`` ignores it.

The judge reads every image (:func:`~detailpp.toy.judge.judge`): object-level accuracy (each prompted object found
with its shape, colour and texture, one-to-one) and image-level accuracy (all found and nothing else in the image,
so no attribute sits on a wrong or extra object), overall and for 2- and 3-object prompts, and what kind of mistake
each failed image makes (:func:`~detailpp.toy.judge.classify_errors`, summed by :func:`error_summary`: wrong object
count, a prompted shape missing, a colour or texture leaked from another prompted object or from nowhere, and the
images whose only mistakes are leaks, the ones Detail++ could fix). For the Detail++ methods,
each subject mask (``out.masks > tau`` at latent size, nearest-upsampled to the image) is compared with the judge's
region of the prompted object it belongs to (IoU; the region of the judged object of the same shape that best agrees
in colour and texture).

Diagnostic items (seed 0 of the first ``diagnostic_prompts`` prompts) also run extra settings (shared self-attention
in both CFG halves, sharing for all steps) and keep every branch's image, to see whether the base branch p1 follows
branch 0's layout (foreground IoU between the branches' judged objects) and what nursing alone does to branch 0.

Items are independent, so they can run in several worker processes on one GPU (the toy UNet is too small to keep a
GPU busy from one process); records are appended to JSON Lines files as they are made, and the summary is rewritten
periodically, so a run cut short still reports the items it finished. Only items finished by every main method count.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import re
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detailpp.bench import BenchError
from detailpp.toy.judge import OBJECT_ERRORS
from detailpp.toy.scenes import ObjectSpec, PromptSpec, held_out_prompts

logger = logging.getLogger(__name__)

#: The benchmark's methods: ``None`` is plain SDXL sampling, a dict holds DetailConfig fields.
METHODS: dict[str, dict[str, Any] | None] = {
    "sdxl": None,
    "pdi": {"nursing": False},
    "pdi_entropy": {"centroid_alignment": False},
    "detailpp": {},
}
#: Extra settings run on the diagnostic items only (not defaults: ways to see why Detail++ does or does not help).
DIAGNOSTICS: dict[str, dict[str, Any]] = {
    "pdi_share_both": {"nursing": False, "share_halves": "both"},
    "detailpp_share_both": {"share_halves": "both"},
    "detailpp_share_all": {"share_steps": 1.0},
    "pdi_no_share": {"nursing": False, "share_attention": False},
    "pdi_share_layers_all": {"nursing": False, "share_layers": "all"},
    "detailpp_share_layers_all": {"share_layers": "all"},
}
#: Forced-layout diagnostics (``detailpp bench toy --force-layout-steps K ...``): ``detailpp_forcedK`` is Detail++
#: with every branch's latent replaced by branch 0's at the end of each of the first K steps (:func:`force_layout`),
#: ``no_alm_forcedK`` the same with ALM off (the image is the last branch alone: what the forcing alone carries
#: over). Not the paper's method: Detail++ with its layout premise (one layout for all branches) made true by hand.
FORCED_RE = re.compile(r"^(detailpp|no_alm)_forced(\d+)$")
FORCED_FIELDS: dict[str, dict[str, Any]] = {"detailpp": {}, "no_alm": {"latent_modification": False}}


def forced_settings(steps: Sequence[int]) -> tuple[str, ...]:
    """The forced-layout diagnostic names for each K of ``steps`` (Detail++ and its no-ALM control)."""
    return tuple(f"{kind}_forced{int(k)}" for k in steps for kind in FORCED_FIELDS)


def force_layout(k: int):
    """A ``callback_on_step_end`` that puts branch 0's latent into every branch at the end of the first ``k`` steps."""

    def callback(pipe, i, t, kwargs):
        latents = kwargs["latents"]
        if i < k:
            latents = latents.clone()
            latents[1:] = latents[0:1]
        return {"latents": latents}

    return callback


def forced_steps(name: str) -> int:
    """K of a forced-layout diagnostic name, 0 for any other method or setting."""
    m = FORCED_RE.match(name)
    return int(m.group(2)) if m else 0


#: Mask thresholds at which the masks' IoU is also reported (the method's own tau is the main number).
IOU_TAUS: tuple[float, ...] = (0.3, 0.5, 0.7)
RECORDS_GLOB = "records*.jsonl"
#: The prompt splits: ``test`` = ``held_out_prompts(n, 0)``; ``validation`` = :func:`validation_prompts`.
SPLITS: tuple[str, ...] = ("test", "validation")
#: Validation prompts avoid every prompt among the first ``TEST_POOL`` test prompts.
TEST_POOL = 1000
TEST_SEED, VALIDATION_SEED = 0, 1


def image_seed(prompt_index: int, seed: int) -> int:
    """The generator seed of image ``seed`` of prompt ``prompt_index`` (the same for every method)."""
    return 10_000 * seed + prompt_index


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def validation_prompts(n: int) -> list[PromptSpec]:
    """``n`` held-out prompts for choosing the toy's hyperparameters, disjoint from the test prompts.

    Hyperparameters of the toy benchmark (a nursing step size, a mask threshold, ...) are chosen on these prompts,
    never on the test prompts whose results are reported: picking them on the test prompts would fit the reported
    numbers to those very prompts. The list is :func:`~detailpp.toy.scenes.held_out_prompts` of seed
    ``VALIDATION_SEED`` without every prompt among the first ``TEST_POOL`` test prompts (``held_out_prompts(TEST_POOL,
    TEST_SEED)``), cut to ``n``. Deterministic, and a shorter list is a prefix of a longer one (both lists are).
    """
    if n <= 0:
        return []
    test = {s.prompt for s in held_out_prompts(TEST_POOL, TEST_SEED)}
    # removing at most TEST_POOL prompts leaves at least n of n + TEST_POOL
    return [s for s in held_out_prompts(n + TEST_POOL, VALIDATION_SEED) if s.prompt not in test][:n]


def split_prompts(n: int, split: str = "test") -> list[PromptSpec]:
    """The first ``n`` prompts of ``split``: ``"test"`` (``held_out_prompts(n, 0)``, what the results report) or
    ``"validation"`` (:func:`validation_prompts`, for choosing hyperparameters)."""
    if split == "test":
        if n > TEST_POOL:
            logger.warning("test prompts beyond the first %d may also be validation prompts", TEST_POOL)
        return held_out_prompts(n, TEST_SEED)
    if split == "validation":
        return validation_prompts(n)
    raise BenchError(f"unknown prompt split {split!r}; choose from {', '.join(SPLITS)}.")


def _split_description(split: str) -> str:
    if split == "test":
        return f"held_out_prompts(n, {TEST_SEED})"
    return (
        f"validation_prompts(n): held_out_prompts(n + {TEST_POOL}, {VALIDATION_SEED}) without the prompts of "
        f"held_out_prompts({TEST_POOL}, {TEST_SEED}), first n"
    )


# ----------------------------------------------------------------------------------------------------------------
# Plans


def _object_phrases(spec: PromptSpec) -> list[tuple[int, int]]:
    """Character spans of each object's full phrase in the prompt, left to right."""
    spans, pos = [], 0
    for o in spec.objects:
        phrase = o.phrase()
        start = spec.prompt.index(phrase, pos)
        spans.append((start, start + len(phrase)))
        pos = start + len(phrase)
    return spans


def scene_plan(spec: PromptSpec, tokenizer) -> dict:
    """The decomposition of a toy prompt read off its scene: p1 drops every colour and texture word, branch k puts
    object k's back. Same rule as :func:`detailpp.decompose.decompose` (keep the sentence, delete modifiers); needs
    no spaCy. Returns a plan dict with each subject's token indices (repeated shapes point at their own word)."""
    from detailpp.plan import subject_token_indices

    spans = _object_phrases(spec)

    def compose(full: int | None) -> str:
        out, pos = [], 0
        for k, ((s, e), o) in enumerate(zip(spans, spec.objects, strict=True)):
            out.append(spec.prompt[pos:s])
            out.append(o.phrase() if k == full else o.phrase(say_colour=False, say_texture=False))
            pos = e
        out.append(spec.prompt[pos:])
        return "".join(out)

    branches = []
    for k, o in enumerate(spec.objects):
        occurrence = [p.shape for p in spec.objects[:k]].count(o.shape)
        attributes = [w for w in (o.texture if o.texture != "plain" else None, o.colour) if w]
        branches.append(
            {
                "prompt": compose(k),
                "subject": o.shape,
                "attributes": attributes,
                "subject_token_indices": list(subject_token_indices(spec.prompt, o.shape, tokenizer, occurrence)),
            }
        )
    return {"prompt": spec.prompt, "base": compose(None), "granularity": "subject", "branches": branches}


def make_plans(specs: Sequence[PromptSpec], source: str, tokenizer, split: str = "test") -> dict[str, dict]:
    """``{prompt: plan dict}``: ``source`` is ``"parser"`` (spaCy, :func:`detailpp.decompose.decompose`),
    ``"scene"`` (:func:`scene_plan`) or the path of a JSON file written by an earlier call (``--write-plans``).

    A plans file is keyed by prompt text: it serves a run only if it holds a plan for each of the run's prompts
    (written for the same ``--split`` and at least as many ``--prompts``); otherwise :class:`BenchError` names the
    file and how to write it (``split`` only goes into that message).
    """
    if source == "scene":
        return {s.prompt: scene_plan(s, tokenizer) for s in specs}
    if source == "parser":
        from detailpp.decompose import decompose

        return {s.prompt: decompose(s.prompt, tokenizer=tokenizer).to_dict() for s in specs}
    rewrite = (
        f"write it with `detailpp bench toy --write-plans {source} --prompts {len(specs)} --split {split}` "
        "(the same --prompts and --split as this run)"
    )
    path = Path(source)
    if not path.is_file():
        raise BenchError(f"--plans {source!r} is neither 'parser', 'scene' nor a plans file; {rewrite}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"cannot read the plans file {source} ({e}); {rewrite}.") from e
    if not isinstance(data, dict):
        raise BenchError(f"the plans file {source} is not a JSON object of prompt -> plan; {rewrite}.")
    missing = [s.prompt for s in specs if s.prompt not in data]
    if missing:
        raise BenchError(
            f"the plans file {source} has no plan for {len(missing)} of the {len(specs)} {split} prompt(s), e.g. "
            f"{missing[0]!r} (plans are keyed by prompt text: was it written for another --split or fewer "
            f"--prompts?); {rewrite}."
        )
    return {s.prompt: data[s.prompt] for s in specs}


def branch_objects(plan: dict, spec: PromptSpec) -> list[int | None]:
    """For each branch of ``plan``, the index of the prompted object it details (``None`` if none fits).

    Branches are taken in the order of their subject's first token and matched, in prompt order, with the objects
    whose shape is the subject.
    """
    branches = plan["branches"]
    order = sorted(range(len(branches)), key=lambda b: min(branches[b].get("subject_token_indices") or [10**6]))
    out: list[int | None] = [None] * len(branches)
    next_obj = 0
    for b in order:
        subject = branches[b]["subject"].split()[-1]
        for k in range(next_obj, len(spec.objects)):
            if spec.objects[k].shape == subject:
                out[b] = k
                next_obj = k + 1
                break
    return out


# ----------------------------------------------------------------------------------------------------------------
# Metrics on one image


def score_seen(expected: Sequence[ObjectSpec], seen: Sequence) -> dict:
    """Object- and image-level binding of judged objects ``seen`` (as :func:`~detailpp.toy.judge.score_image`),
    with the kinds of mistake (``"errors"``: :func:`~detailpp.toy.judge.classify_errors`)."""
    from detailpp.toy.judge import classify_errors, match_objects

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


# ----------------------------------------------------------------------------------------------------------------
# Running items


@dataclass
class Settings:
    """What a run does (all of it goes into the results file)."""

    model: str = "toy"
    device: str | None = None
    dtype: str | None = "float32"
    steps: int = 20
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    methods: tuple[str, ...] = tuple(METHODS)
    diagnostics: tuple[str, ...] = tuple(DIAGNOSTICS)
    diagnostic_prompts: int = 0
    grid_prompts: int = 0
    threads: int = 1
    deadline: float | None = None  # time.time() after which no new item starts
    detail_config: dict = field(default_factory=dict)  # DetailConfig fields under every Detail++ method's own
    extra: dict = field(default_factory=dict)


def method_fields(name: str, overlay: dict | None = None) -> dict[str, Any] | None:
    """The DetailConfig fields of method or diagnostic setting ``name``: ``{**overlay, **its own}`` (its own win);
    ``None`` for plain sampling."""
    forced = FORCED_RE.match(name)
    own = METHODS[name] if name in METHODS else FORCED_FIELDS[forced.group(1)] if forced else DIAGNOSTICS[name]
    return None if own is None else {**(overlay or {}), **own}


def check_detail_config(overlay: dict, names: Sequence[str], model_defaults: dict | None = None) -> None:
    """Raise :class:`BenchError` unless the config every name runs with works: ``DetailConfig(**{**model_defaults,
    **method_fields(name, overlay)})`` (the model's recommended settings under the overlay, as in :func:`run_item`)."""
    import dataclasses

    from detailpp.config import DetailConfig

    known = [f.name for f in dataclasses.fields(DetailConfig)]
    unknown = [k for k in overlay if k not in known]
    if unknown:
        raise BenchError(
            f"--detail-config: unknown DetailConfig field(s) {', '.join(map(repr, unknown))}; "
            f"the fields are {', '.join(known)}."
        )
    for name in names:
        fields = method_fields(name, overlay)
        if fields is None:
            continue
        try:
            DetailConfig(**{**(model_defaults or {}), **fields})
        except (TypeError, ValueError) as e:
            raise BenchError(f"--detail-config {json.dumps(overlay)} does not work for {name!r}: {e}") from e


def build_items(specs: Sequence[PromptSpec], n_seeds: int, settings: Settings) -> list[dict]:
    """Every (prompt, seed) item, seed-major (all prompts of seed 0 first), so a run cut short covers all prompts."""
    items = []
    for seed in range(n_seeds):
        for p, spec in enumerate(specs):
            diag = seed == 0 and p < settings.diagnostic_prompts
            items.append(
                {
                    "prompt_index": p,
                    "seed": seed,
                    "prompt": spec.prompt,
                    "objects": [[o.shape, o.colour, o.texture] for o in spec.objects],
                    "diagnostic": diag,
                    "grid": seed == 0 and p < settings.grid_prompts,
                }
            )
    return items


def _spec(item: dict) -> PromptSpec:
    return PromptSpec(item["prompt"], tuple(ObjectSpec(*o) for o in item["objects"]))


def run_item(pipe, item: dict, plan: dict, settings: Settings, grid_dir: Path | None = None, judge_fn=None):
    """Yield one record per method for one (prompt, seed) item."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    if judge_fn is None:
        from detailpp.toy.judge import judge as judge_fn
    spec = _spec(item)
    names = list(settings.methods) + (list(settings.diagnostics) if item["diagnostic"] else [])
    seed = image_seed(item["prompt_index"], item["seed"])
    common = dict(
        prompt=spec.prompt,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        output_type="pil",
    )
    b_obj = branch_objects(plan, spec)
    for name in names:
        fields = method_fields(name, settings.detail_config)
        started = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(seed)
        out = None
        if fields is None:
            image = StableDiffusionXLPipeline.__call__(pipe, generator=generator, **common).images[0]
        else:
            config = pipe.make_detail_config(**fields)  # over the model's recommended settings
            k = forced_steps(name)
            out = pipe(
                **common,
                callback_on_step_end=force_layout(k) if k else None,
                plan=plan,
                detail_config=config,
                generator=generator,
                return_masks=True,
                return_branch_images=item["diagnostic"],
            )
            image = out.images[0]
        seconds = time.perf_counter() - started
        seen = judge_fn(image)
        rec = {
            "prompt_index": item["prompt_index"],
            "seed": item["seed"],
            "n_objects": len(spec.objects),
            "method": name,
            "image_seed": seed,
            "seconds": round(seconds, 4),
            **score_seen(spec.objects, seen),
        }
        hw = (image.height, image.width)
        if out is not None:
            regions = [seen[j].mask if j is not None else None for j in assign_regions(spec.objects, seen)]
            maps = out.masks.float().numpy() if out.masks is not None else np.zeros((0, 1, 1))
            rec["masks"] = mask_records(upsample_masks(maps, hw), config.mask_threshold, b_obj, regions)
            rec["nursing"] = [
                {
                    "updates": r.updates,
                    "first_loss": r.losses[0] if r.losses else None,
                    "stopped_early": r.stopped_early,
                }
                for r in (out.nursing or [])
            ]
            if out.branch_images is not None:
                p0, p1 = out.branch_images[0], out.branch_images[1]
                seen0, seen1 = judge_fn(p0), judge_fn(p1)
                fg0, fg1, fgf = foreground(seen0, hw), foreground(seen1, hw), foreground(seen, hw)
                rec["branches"] = {
                    "p0": score_seen(spec.objects, seen0),
                    "p1_n_seen": len(seen1),
                    "p1_shapes": match_shapes(spec.objects, seen1),
                    "layout_iou_p0_p1": iou(fg0, fg1),
                    "layout_iou_p0_final": iou(fg0, fgf),
                }
                rec["_fg_p0"] = fg0  # for the layout check against plain sampling (dropped before writing)
        if name == "sdxl":
            rec["_fg_sdxl"] = foreground(seen, hw)
        if item["grid"] and grid_dir is not None:
            grid_dir.mkdir(parents=True, exist_ok=True)
            stem = f"p{item['prompt_index']:04d}_{name}"
            image.save(grid_dir / f"{stem}.png")
            if out is not None and out.masks is not None:
                np.save(grid_dir / f"{stem}_masks.npy", (upsample_masks(maps, hw) > config.mask_threshold))
                np.save(grid_dir / f"{stem}_objects.npy", np.array([-1 if k is None else k for k in b_obj]))
            if out is not None and out.branch_images is not None:
                out.branch_images[1].save(grid_dir / f"{stem}_p1.png")
        yield rec


def match_shapes(expected: Sequence[ObjectSpec], seen: Sequence) -> float:
    """Share of prompted shapes found (one-to-one) among judged objects: does the base branch draw the layout?"""
    from detailpp.toy.judge import match_objects

    return float(match_objects(expected, seen, attributes=("shape",)).mean()) if expected else 1.0


def _finish_item(records: list[dict]) -> list[dict]:
    """Add the plain-vs-branch-0 layout check to an item's records and drop the arrays."""
    fg_sdxl = next((r.get("_fg_sdxl") for r in records if "_fg_sdxl" in r), None)
    for r in records:
        fg0 = r.pop("_fg_p0", None)
        r.pop("_fg_sdxl", None)
        if fg0 is not None and fg_sdxl is not None:
            r["branches"]["layout_iou_p0_sdxl"] = iou(fg0, fg_sdxl)
    return records


def _load_pipe(settings: Settings, device: str | None):
    import torch

    from detailpp.loading import load_pipeline

    torch.set_num_threads(max(1, settings.threads))
    pipe = load_pipeline(settings.model, device=device, dtype=settings.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def work(
    rank: int,
    items: Sequence[dict],
    plans: dict[str, dict],
    settings: Settings,
    work_dir: Path,
    next_item: Callable[[], int],
    stop: Callable[[], bool] = lambda: False,
    pipe=None,
) -> int:
    """Run items (taken by index from ``next_item``) until none is left, the deadline passes or ``stop()``;
    append their records to ``work_dir/records.part<rank>.jsonl``. Returns how many items were finished."""
    device = settings.device
    if pipe is None:
        import torch

        if (device in (None, "cuda")) and torch.cuda.is_available() and torch.cuda.device_count() > 1:
            device = f"cuda:{rank % torch.cuda.device_count()}"
        pipe = _load_pipe(settings, device)
    done = 0
    started = time.time()
    with open(work_dir / f"records.part{rank}.jsonl", "a", encoding="utf-8") as f:
        while not stop() and (settings.deadline is None or time.time() < settings.deadline):
            i = next_item()
            if i >= len(items):
                break
            item = items[i]
            records = _finish_item(list(run_item(pipe, item, plans[item["prompt"]], settings, work_dir / "grid")))
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            done += 1
            if done % 10 == 0:
                logger.info("worker %d: %d items in %.0f s", rank, done, time.time() - started)
    return done


def _worker_main(rank, items, plans, settings, work_dir, counter, stop_event, log_level) -> None:
    logging.basicConfig(level=log_level, format=f"%(levelname)s w{rank} %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(settings.threads))

    def next_item() -> int:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        return i

    work(rank, items, plans, settings, Path(work_dir), next_item, stop_event.is_set)


# ----------------------------------------------------------------------------------------------------------------
# Aggregation


def read_records(work_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(work_dir).glob(RECORDS_GLOB)):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a killed worker
                    continue
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _binding(recs: Sequence[dict]) -> dict:
    objs = [f for r in recs for f in r["found"]]
    return {
        "object_accuracy": _mean(objs),
        "image_accuracy": _mean([r["image_correct"] for r in recs]),
        "n_images": len(recs),
        "n_objects": len(objs),
        "errors": error_summary(recs),
    }


#: Image-level failure kinds of :func:`error_summary` (an image counts in a kind if it shows it at least once).
IMAGE_ERRORS: tuple[str, ...] = ("count", "extra", "missing", *OBJECT_ERRORS, "attributes_only", "binding_only")


def error_summary(recs: Sequence[dict]) -> dict:
    """What kind of mistakes the images of ``recs`` make, from each record's ``"errors"``
    (:func:`~detailpp.toy.judge.classify_errors` of the judged image; records without it are left out).

    Returns ``{"n_images", "n_failed", "n_objects", "images", "failed_images", "objects"}``:

    - ``images``: per kind, the share of the ``n_images`` images showing it at least once (``failed`` = 1 - image
      accuracy; ``count``: wrong number of objects, split into ``extra`` (more than prompted) and ``missing``
      (fewer); ``shape_missing``, ``colour_leak``, ...: at least one prompted object of that kind;
      ``attributes_only``: the right objects, some with wrong attributes; ``binding_only``: every mistake is a leaked
      attribute, with the right count);
    - ``failed_images``: the same shares of the ``n_failed`` failed images (``None`` when none failed); a correct
      image shows no kind, and a failed image may show several;
    - ``objects``: per object kind (``not_found``, ``shape_missing``, ``colour_leak``, ...), the number of prompted
      objects of that kind over the ``n_objects`` prompted objects.
    """
    errs = [(r["errors"], len(r["found"])) for r in recs if "errors" in r]
    n_images, n_objects = len(errs), sum(n for _, n in errs)
    failed = [e for e, _ in errs if e["failed"]]

    def share(num: float, den: int) -> float | None:
        return float(num / den) if den else None

    return {
        "n_images": n_images,
        "n_failed": len(failed),
        "n_objects": n_objects,
        "images": {k: share(sum(bool(e[k]) for e, _ in errs), n_images) for k in ("failed", *IMAGE_ERRORS)},
        "failed_images": {k: share(sum(bool(e[k]) for e in failed), len(failed)) for k in IMAGE_ERRORS},
        "objects": {k: share(sum(int(e[k]) for e, _ in errs), n_objects) for k in ("not_found", *OBJECT_ERRORS)},
    }


def binding_summary(recs: Sequence[dict]) -> dict:
    """Object/image accuracy and failure kinds (:func:`error_summary`) overall and by object count
    (``"by_objects": {"2": ..., "3": ...}``)."""
    out = _binding(recs)
    counts = sorted({r["n_objects"] for r in recs})
    out["by_objects"] = {str(n): _binding([r for r in recs if r["n_objects"] == n]) for n in counts}
    return out


def paired_delta(a: Sequence[dict], b: Sequence[dict], key: str = "image_correct") -> dict:
    """Mean of b - a over paired images (same prompt and seed) with a normal 95% interval."""
    d = np.array([float(y[key]) - float(x[key]) for x, y in zip(a, b, strict=True)])
    if not len(d):
        return {"delta": None, "ci95": None, "n": 0}
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"delta": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)], "n": int(len(d))}


def _mask_stats(entries: Sequence[dict]) -> dict:
    matched = [e for e in entries if e["iou"] is not None]
    out: dict[str, Any] = {
        "mean_iou": _mean([e["iou"] for e in matched]),
        "n_masks": len(entries),
        "n_matched": len(matched),
        "peak_inside": _mean([e["peak_inside"] for e in matched]),
        "mask_area": _mean([e["mask_area"] for e in entries]),
        "region_area": _mean([e["region_area"] for e in matched]),
    }
    out["mean_iou_at_tau"] = {f"{t:g}": _mean([e["iou_tau"][f"{t:g}"] for e in matched]) for t in IOU_TAUS}
    return out


def mask_summary(recs: Sequence[dict]) -> dict:
    """Mask IoU with the judge's regions: overall, by object count, and by the object's position in the prompt."""
    entries = [(r["n_objects"], m) for r in recs for m in r.get("masks", [])]
    out = _mask_stats([m for _, m in entries])
    out["by_objects"] = {}
    for n in sorted({n for n, _ in entries}):
        sub = [m for k, m in entries if k == n]
        by_pos = {str(p + 1): _mask_stats([m for m in sub if m["object"] == p]) for p in range(n)}
        out["by_objects"][str(n)] = {**_mask_stats(sub), "by_position": by_pos}
    return out


def aggregate(records: Sequence[dict], settings: Settings, planned: dict, judge: dict | None) -> dict:
    """The results file's content from the records (only items finished by every main method count)."""
    by_item: dict[tuple[int, int], dict[str, dict]] = {}
    for r in records:
        by_item.setdefault((r["prompt_index"], r["seed"]), {})[r["method"]] = r
    main = list(settings.methods)
    keys = sorted((k for k, v in by_item.items() if all(m in v for m in main)), key=lambda k: (k[1], k[0]))
    methods = {m: binding_summary([by_item[k][m] for k in keys]) for m in main}
    if "sdxl" in main:
        for m in main:
            if m != "sdxl":
                pairs = ([by_item[k]["sdxl"] for k in keys], [by_item[k][m] for k in keys])
                methods[m]["image_accuracy_vs_sdxl"] = paired_delta(*pairs)
                methods[m]["object_accuracy_vs_sdxl"] = paired_delta(
                    *[[{"x": float(np.mean(r["found"]))} for r in side] for side in pairs], key="x"
                )
    masks = {m: mask_summary([by_item[k][m] for k in keys]) for m in main if METHODS.get(m) is not None}
    diag_names = list(settings.diagnostics)
    dkeys = sorted(k for k, v in by_item.items() if all(m in v for m in main + diag_names) and k[1] == 0)
    diagnostics: dict[str, Any] = {"n_images": len(dkeys)}
    if dkeys and settings.diagnostic_prompts:
        for m in main + diag_names:
            recs = [by_item[k][m] for k in dkeys]
            entry: dict[str, Any] = binding_summary(recs)
            if method_fields(m) is not None:
                with_br = [r for r in recs if "branches" in r]
                br = [r["branches"] for r in with_br]
                entry["branch0"] = binding_summary(
                    [{**r["branches"]["p0"], "n_objects": r["n_objects"]} for r in with_br]
                )
                entry["layout"] = {
                    "iou_p0_p1": _mean([b["layout_iou_p0_p1"] for b in br]),
                    "iou_p0_final": _mean([b["layout_iou_p0_final"] for b in br]),
                    "iou_p0_sdxl": _mean([b["layout_iou_p0_sdxl"] for b in br if "layout_iou_p0_sdxl" in b]),
                    "p1_shapes_found": _mean([b["p1_shapes"] for b in br]),
                    "p1_object_count_right": _mean([r["branches"]["p1_n_seen"] == r["n_objects"] for r in with_br]),
                }
                entry["mask_iou"] = mask_summary(recs)
                if "sdxl" in main:
                    entry["image_accuracy_vs_sdxl"] = paired_delta([by_item[k]["sdxl"] for k in dkeys], recs)
            diagnostics[m] = entry
    seeds = sorted({k[1] for k in keys})
    prompts = sorted({k[0] for k in keys})
    timing = {}
    for m in main + diag_names:
        secs = [r["seconds"] for r in records if r["method"] == m]
        if secs:
            timing[m] = {"mean_s": float(np.mean(secs)), "n": len(secs)}
    return {
        "n_prompts": len(prompts),
        "n_seeds": len(seeds),
        "judge_accuracy": None if judge is None else judge.get("object_accuracy"),
        "methods": methods,
        "mask_iou": masks,
        "n_images_per_method": len(keys),
        "complete": len(keys) == planned["n_prompts"] * planned["n_seeds"],
        "planned": planned,
        "judge": judge,
        "diagnostics": diagnostics,
        "seconds_per_image": timing,
        "settings": {
            "model": settings.model,
            "dtype": settings.dtype,
            "steps": settings.steps,
            "guidance_scale": settings.guidance_scale,
            "height": settings.height,
            "width": settings.width,
            "scheduler": "EulerDiscreteScheduler (the model's)",
            "image_seed": "10000 * seed + prompt_index, one CPU torch.Generator per image, same for every method",
            "methods": {m: METHODS.get(m) for m in main},
            "diagnostic_settings": {
                m: {**method_fields(m), **({"force_layout_steps": forced_steps(m)} if forced_steps(m) else {})}
                for m in diag_names
            },
            "diagnostic_prompts": settings.diagnostic_prompts,
            "detail_config": settings.detail_config,
            "mask_iou": "out.masks > tau (latent size, nearest-upsampled) vs the judge's region of the same object",
            "errors": "detailpp.toy.judge.classify_errors per image; images: share of n_images showing a kind, "
            "failed_images: share of n_failed, objects: prompted objects of a kind / n_objects",
            **settings.extra,
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# The run


def run_benchmark(
    n_prompts: int,
    n_seeds: int,
    settings: Settings,
    work_dir: Path,
    results_path: Path,
    plans_source: str = "parser",
    workers: int = 0,
    judge_scenes: int = 400,
    max_minutes: float | None = None,
    grid_path: Path | None = None,
    markdown_path: Path | None = None,
    snapshot_every: float = 30.0,
    split: str = "test",
) -> dict:
    """Make, judge and summarise every item; write the results JSON (and a grid / Markdown table when asked).

    ``split``: the prompts (:func:`split_prompts`): ``"test"`` for reported results, ``"validation"`` for choosing
    hyperparameters. ``settings.detail_config`` is checked against every method that will run before anything starts.
    ``workers=0`` runs in this process; ``workers=N`` spawns N processes (each loads the pipeline; on one GPU they
    overlap the toy UNet's small kernels). ``max_minutes`` stops starting items after that long; the results then
    cover the finished items (seed-major order: every prompt's seed 0 first).
    """
    t0 = time.time()
    if split not in SPLITS:
        raise BenchError(f"unknown prompt split {split!r}; choose from {', '.join(SPLITS)}.")
    runs = list(settings.methods) + (list(settings.diagnostics) if settings.diagnostic_prompts > 0 else [])
    from detailpp.config import ConfigError
    from detailpp.loading import model_detail_defaults

    try:
        model_defaults = model_detail_defaults(settings.model)
    except ConfigError as e:
        raise BenchError(str(e)) from e
    check_detail_config(settings.detail_config, runs, model_defaults)
    specs = split_prompts(n_prompts, split)
    tokenizer = _tokenizer(settings.model)
    plans = make_plans(specs, plans_source, tokenizer, split)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for old in work_dir.glob(RECORDS_GLOB):
        old.unlink()
    settings.extra = {
        **settings.extra,
        "plans": plans_source if plans_source in ("parser", "scene") else "file",
        "split": split,
        "prompt_seed": TEST_SEED if split == "test" else VALIDATION_SEED,
        "prompts": _split_description(split),
        "workers": workers,
        "model_detail_defaults": model_defaults,
    }
    items = build_items(specs, n_seeds, settings)
    if max_minutes is not None:
        settings.deadline = t0 + 60.0 * max_minutes
    planned = {"n_prompts": len(specs), "n_seeds": n_seeds, "items": len(items)}
    judge: dict | None = None

    def snapshot() -> dict:
        res = aggregate(read_records(work_dir), settings, planned, judge)
        res["wall_seconds"] = round(time.time() - t0, 1)
        _write_json(results_path, res)
        return res

    if workers <= 0:
        counter = iter(range(10**9))
        work(0, items, plans, settings, work_dir, lambda: next(counter))
        judge = _judge_accuracy(judge_scenes)
    else:
        ctx = mp.get_context("spawn")
        counter = ctx.Value("i", 0)
        stop = ctx.Event()
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, items, plans, settings, str(work_dir), counter, stop, logging.getLogger().level),
                daemon=True,
            )
            for r in range(workers)
        ]
        for p in procs:
            p.start()
        judge = _judge_accuracy(judge_scenes)  # on the CPU, while the workers sample
        last = time.time()
        grace = 60.0
        while any(p.is_alive() for p in procs):
            time.sleep(2.0)
            if time.time() - last > snapshot_every:
                res = snapshot()
                last = time.time()
                logger.info("%d/%d items, %.0f s", res["n_images_per_method"], len(items), time.time() - t0)
            if settings.deadline is not None and time.time() > settings.deadline:
                stop.set()
                if time.time() > settings.deadline + grace:
                    for p in procs:
                        if p.is_alive():
                            logger.warning("ending worker pid %d after the deadline", p.pid)
                            p.terminate()
        for p in procs:
            p.join(timeout=10)
    res = snapshot()
    if grid_path is not None:
        try:
            save_binding_grid(work_dir / "grid", specs, grid_path)
        except (OSError, ValueError) as e:
            logger.warning("no grid: %s", e)
    if markdown_path is not None:
        Path(markdown_path).write_text(markdown_table(res), encoding="utf-8")
    logger.info(
        "results: %s (%d items per method, %.0f s)", results_path, res["n_images_per_method"], time.time() - t0
    )
    return res


def _tokenizer(model: str):
    from transformers import CLIPTokenizer

    from detailpp.loading import TOY_MODEL_DIR

    if model == "toy":
        return CLIPTokenizer.from_pretrained(str(TOY_MODEL_DIR / "tokenizer"))
    if model in ("tiny-random", "sdxl-random"):
        from detailpp.resources import load_clip_tokenizer

        return load_clip_tokenizer()
    return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")  # a Hub id or a local diffusers folder


def _judge_accuracy(n: int) -> dict | None:
    if n <= 0:
        return None
    from detailpp.toy.judge import judge_accuracy

    started = time.time()
    # the world the shipped model is trained in (run 5 on): the slots layout
    res = judge_accuracy(n=n, seed=2024, split="held_out", perturbed=True, layout="slots")
    res["seconds"] = round(time.time() - started, 1)
    res["setting"] = f"judge_accuracy(n={n}, seed=2024, split='held_out', perturbed=True, layout='slots')"
    return res


def _write_json(path: Path, data: dict) -> None:
    from detailpp.atomic import atomic_write_bytes

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), (json.dumps(data, indent=1) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# Reports

LABELS = {
    "sdxl": "plain sampling (SDXL pipeline)",
    "pdi": "PDI only",
    "pdi_entropy": "PDI + L_ent",
    "detailpp": "Detail++ (PDI + L_ent + L_align)",
    "pdi_share_both": "PDI, sharing in both CFG halves",
    "detailpp_share_both": "Detail++, sharing in both CFG halves",
    "detailpp_share_all": "Detail++, sharing all steps (S = T)",
    "pdi_no_share": "PDI without shared self-attention",
    "pdi_share_layers_all": "PDI, sharing in every self-attention layer",
    "detailpp_share_layers_all": "Detail++, sharing in every self-attention layer",
}


def _label(name: str) -> str:
    k = forced_steps(name)
    if k and name.startswith("detailpp"):
        return f"Detail++, branches forced onto branch 0 for {k} step(s)"
    if k:
        return f"control: forced for {k} step(s), ALM off"
    return LABELS.get(name, name)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown_table(res: dict) -> str:
    """The results as Markdown tables (binding; masks; diagnostics)."""
    split = res.get("settings", {}).get("split", "test")
    lines = [
        f"{res['n_prompts']} held-out {split} prompts x {res['n_seeds']} seed(s) = {res['n_images_per_method']} "
        f"images per method; judge object accuracy on perturbed held-out renders: {_pct(res['judge_accuracy'])} %.",
        "",
        "| method | object acc. | image acc. | image acc. vs plain (95% CI) | 2-obj object | 2-obj image "
        "| 3-obj object | 3-obj image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, s in res["methods"].items():
        by = s.get("by_objects", {})
        d = s.get("image_accuracy_vs_sdxl")
        delta = ""
        if d and d["delta"] is not None:
            delta = f"{100 * d['delta']:+.1f} ({100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f})"
        lines.append(
            f"| {_label(m)} | {_pct(s['object_accuracy'])} | {_pct(s['image_accuracy'])} | {delta} | "
            f"{_pct(by.get('2', {}).get('object_accuracy'))} | {_pct(by.get('2', {}).get('image_accuracy'))} | "
            f"{_pct(by.get('3', {}).get('object_accuracy'))} | {_pct(by.get('3', {}).get('image_accuracy'))} |"
        )
    lines += failure_table(res["methods"])
    lines += [
        "",
        "| method | mask IoU (tau) | IoU at 0.3 / 0.5 / 0.7 | peak inside | 2-obj: 1st / 2nd | 3-obj: 1st / 2nd / 3rd "
        "| masks matched |",
        "|---|---|---|---|---|---|---|",
    ]

    def f2(x):
        return "-" if x is None else f"{x:.2f}"

    for m, s in res["mask_iou"].items():
        by = s.get("by_objects", {})
        pos2 = " / ".join(f2(v["mean_iou"]) for v in by.get("2", {}).get("by_position", {}).values())
        pos3 = " / ".join(f2(v["mean_iou"]) for v in by.get("3", {}).get("by_position", {}).values())
        at = " / ".join(f2(v) for v in s["mean_iou_at_tau"].values())
        lines.append(
            f"| {_label(m)} | {f2(s['mean_iou'])} | {at} | {_pct(s['peak_inside'])} % | {pos2} | {pos3} | "
            f"{s['n_matched']}/{s['n_masks']} |"
        )
    diag = res.get("diagnostics", {})
    if diag.get("n_images"):
        lines += [
            "",
            f"Diagnostics on {diag['n_images']} images (seed 0 of the first prompts):",
            "",
            "| setting | image acc. | vs plain | branch 0 image acc. | layout IoU p0-p1 | p1 shapes found | "
            "layout IoU p0-final | layout IoU p0-plain | mask IoU |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m, s in diag.items():
            if m == "n_images":
                continue
            lay = s.get("layout", {})
            d = s.get("image_accuracy_vs_sdxl")
            delta = "" if not d or d["delta"] is None else f"{100 * d['delta']:+.1f}"
            lines.append(
                f"| {_label(m)} | {_pct(s['image_accuracy'])} | {delta} | "
                f"{_pct(s.get('branch0', {}).get('image_accuracy'))} | {f2(lay.get('iou_p0_p1'))} | "
                f"{_pct(lay.get('p1_shapes_found'))} | {f2(lay.get('iou_p0_final'))} | "
                f"{f2(lay.get('iou_p0_sdxl'))} | {f2(s.get('mask_iou', {}).get('mean_iou'))} |"
            )
    return "\n".join(lines) + "\n"


def failure_table(methods: dict) -> list[str]:
    """The "failure kinds" Markdown table (lines, starting with a blank one): per method, its failed images and the
    share of them showing each kind of :func:`error_summary` (an image may show several)."""
    lines = [
        "",
        "Failure kinds, % of each method's failed images (an image may show several; leak = the colour or texture of "
        "another prompted object; attributes only = the right objects, some with a wrong colour or texture; binding "
        "only = attributes only, every mistake a leak):",
        "",
        "| method | failed images | wrong count (extra / missing) | shape missing | colour leak | colour other "
        "| texture leak | texture other | attributes only | binding only |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in methods.items():
        e = s.get("errors") or {}
        f = e.get("failed_images") or {}
        n_failed = f"{e['n_failed']}/{e['n_images']}" if e.get("n_images") else "-"
        count = f"{_pct(f.get('count'))} ({_pct(f.get('extra'))} / {_pct(f.get('missing'))})"
        kinds = " | ".join(_pct(f.get(k)) for k in (*OBJECT_ERRORS, "attributes_only", "binding_only"))
        lines.append(f"| {_label(m)} | {n_failed} | {count} | {kinds} |")
    return lines


MASK_COLOURS = np.array([[255, 60, 60], [60, 200, 255], [255, 230, 40]], dtype=np.float32)


def save_binding_grid(grid_dir: Path, specs: Sequence[PromptSpec], path: Path, max_rows: int = 8) -> None:
    """Rows: prompt | plain | Detail++ | Detail++'s binary masks over its image | Detail++'s base branch p1."""
    from PIL import Image, ImageDraw

    rows = []
    for p, spec in enumerate(specs):
        plain, dpp = grid_dir / f"p{p:04d}_sdxl.png", grid_dir / f"p{p:04d}_detailpp.png"
        if plain.is_file() and dpp.is_file():
            rows.append((p, spec))
        if len(rows) == max_rows:
            break
    if not rows:
        raise ValueError(f"no grid images in {grid_dir}")
    size = Image.open(grid_dir / f"p{rows[0][0]:04d}_sdxl.png").size[0]
    text_w, head = 150, 16
    cols = ["plain", "Detail++", "masks", "p1 (base)"]
    canvas = Image.new("RGB", (text_w + len(cols) * size, head + len(rows) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(cols):
        draw.text((text_w + c * size + 4, 2), title, fill="black")
    for r, (p, spec) in enumerate(rows):
        y = head + r * size
        draw.multiline_text((3, y + 4), "\n".join(textwrap.wrap(spec.prompt, 24)), fill="black", spacing=2)
        plain = Image.open(grid_dir / f"p{p:04d}_sdxl.png").convert("RGB")
        dpp = Image.open(grid_dir / f"p{p:04d}_detailpp.png").convert("RGB")
        canvas.paste(plain, (text_w, y))
        canvas.paste(dpp, (text_w + size, y))
        mask_file = grid_dir / f"p{p:04d}_detailpp_masks.npy"
        if mask_file.is_file():
            masks = np.load(mask_file)
            arr = np.asarray(dpp, dtype=np.float32) * 0.45
            for k in range(masks.shape[0]):
                m = masks[k]
                arr[m] = 0.5 * arr[m] + 0.5 * MASK_COLOURS[k % len(MASK_COLOURS)]
            canvas.paste(Image.fromarray(arr.clip(0, 255).astype(np.uint8)), (text_w + 2 * size, y))
        p1 = grid_dir / f"p{p:04d}_detailpp_p1.png"
        if p1.is_file():
            canvas.paste(Image.open(p1).convert("RGB"), (text_w + 3 * size, y))
    canvas.save(path, optimize=True)
