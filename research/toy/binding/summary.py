"""Summaries of the records: binding accuracy, failure kinds, paired differences between methods, mask agreement."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from research.toy.binding.methods import METHODS, BindingSettings, forced_steps, method_fields
from research.toy.binding.scoring import IOU_TAUS
from research.toy.judge import OBJECT_ERRORS


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
    (:func:`~research.toy.judge.classify_errors` of the judged image; records without it are left out).

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


def aggregate(records: Sequence[dict], settings: BindingSettings, planned: dict, judge: dict | None) -> dict:
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
            "errors": "research.toy.judge.classify_errors per image; images: share of n_images showing a kind, "
            "failed_images: share of n_failed, objects: prompted objects of a kind / n_objects",
            **settings.extra,
        },
    }
