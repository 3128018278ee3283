"""The results as Markdown tables and the picture grid."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from research.toy.binding.methods import forced_steps
from research.toy.judge import OBJECT_ERRORS
from research.toy.scenes import PromptSpec

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
