"""Writing results: atomic PNG files with generation parameters, branch grids and mask overlays."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.PngImagePlugin
import torch

from detailpp.atomic import atomic_write_bytes

#: ``--scheduler`` name -> (diffusers class, from_config overrides, A1111's sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpm++-2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
_A1111_NAMES = {cls: name for cls, kw, name in SCHEDULERS.values() if not kw.get("use_karras_sigmas")}


def a1111_sampler(scheduler) -> str:
    """The ``Sampler:`` name A1111 writes for a diffusers scheduler (its class name when A1111 has none)."""
    cls_name = type(scheduler).__name__
    name = _A1111_NAMES.get(cls_name, cls_name)
    if cls_name == "DPMSolverMultistepScheduler" and getattr(scheduler.config, "use_karras_sigmas", False):
        name += " Karras"
    return name


def save_png(image: PIL.Image.Image, path: str | Path, text_chunks: dict[str, str] | None = None) -> None:
    """Save ``image`` as PNG with ``tEXt``/``iTXt`` chunks (e.g. A1111's ``parameters``), atomically."""
    info = PIL.PngImagePlugin.PngInfo()
    for key, value in (text_chunks or {}).items():
        info.add_itxt(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def a1111_parameters(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    sampler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """The ``parameters`` text the AUTOMATIC1111 web UI writes (and many tools read back)."""
    fields = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": guidance_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
    }
    fields |= extra or {}
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return PIL.ImageFont.load_default()


#: The least space between two words of a caption, in font sizes: the default font's own space (a fifth of the size
#: at small sizes) makes "next to a" read as "next toa".
WORD_GAP = 0.4


def caption_lines(text: str, font: PIL.ImageFont.ImageFont, width: float, font_size: int) -> list[list[tuple]]:
    """``text`` wrapped to ``width`` pixels: lines of ``(word, x)``, words at least :data:`WORD_GAP` font sizes apart
    (a word wider than a line gets a line of its own)."""
    gap = max(font.getlength(" "), WORD_GAP * font_size)
    lines: list[list[tuple]] = []
    line: list[tuple] = []
    x = 0.0
    for word in text.split():
        length = font.getlength(word)
        if line and x + gap + length > width:
            lines.append(line)
            line, x = [], 0.0
        x += gap if line else 0.0
        line.append((word, x))
        x += length
    return [*lines, line] if line else lines


def captioned_grid(images: Sequence[PIL.Image.Image], captions: Sequence[str], columns: int | None = None):
    """Images side by side, each with its caption underneath (the paper's Figure 2 layout), wrapped to the image's
    width (at most four lines)."""
    if not images:
        raise ValueError("No image to put in a grid.")
    w, h = images[0].size
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    font_size = max(10, w // 24)
    font = _font(font_size)
    wrapped = [caption_lines(c, font, w - 8, font_size)[:4] or [[]] for c in captions]
    line_h = int(font_size * 1.25)
    caption_h = (max(len(x) for x in wrapped) + 1) * line_h
    grid = PIL.Image.new("RGB", (columns * w, rows * (h + caption_h)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = (i % columns) * w, (i // columns) * (h + caption_h)
        grid.paste(img.convert("RGB").resize((w, h)), (x, y))
        for j, line in enumerate(lines):
            for word, dx in line:
                draw.text((x + 4 + dx, y + h + 4 + j * line_h), word, fill="black", font=font)
    return grid


def _shift_any(m: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` pixels (a square) of a set pixel of ``m``."""
    out = m.copy()
    h, w = m.shape
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            shifted = np.zeros_like(m)
            shifted[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = m[
                max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
            out |= shifted
    return out


def mask_overlay(
    image: PIL.Image.Image, mask: torch.Tensor | np.ndarray, color=(255, 32, 32), alpha=0.5, outline: int | None = None
):
    """``image`` with ``mask`` (any size, bool or [0, 1]) tinted in ``color`` where it is set, and outlined.

    The outline is visible over any colour, a red object under a red tint included: white just inside the mask's
    edge, black just outside it, each ``outline`` pixels wide (default: 1 per 128 pixels of the image's shorter side,
    at least 1; 0: no outline).
    """
    m = mask.detach().float().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, dtype=np.float32)
    m_img = PIL.Image.fromarray((np.clip(m, 0, 1) * 255).astype(np.uint8)).resize(image.size, PIL.Image.NEAREST)
    weight = np.asarray(m_img, dtype=np.float32)[..., None] / 255.0 * alpha
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = base * (1 - weight) + np.array(color, dtype=np.float32) * weight
    width = max(1, min(image.size) // 128) if outline is None else outline
    if width > 0:
        inside = np.asarray(m_img) >= 128
        outside = ~inside
        tinted[inside & _shift_any(outside, width)] = 255.0  # white inner edge
        tinted[outside & _shift_any(inside, width)] = 0.0  # black outer edge
    return PIL.Image.fromarray(tinted.round().astype(np.uint8))


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG file."""
    with PIL.Image.open(path) as img:
        img.load()
        return dict(getattr(img, "text", {}))


def dumps(data: Any) -> str:
    """``data`` as JSON that every reader accepts: a number that is not finite (a NaN loss) is written as ``null``,
    never as the bare ``NaN`` Python would write."""
    return json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False)


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data
