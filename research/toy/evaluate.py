"""Plain-sampling binding accuracy of a toy pipeline on held-out and seen prompts, judged by :mod:`~.judge`, and
whether its layout follows the noise (the same seed with and without the prompts' colour and texture words).

``python -m research.toy.evaluate --prompts 48 --guidance 1 3 7.5`` measures the layout agreement of the packaged
model at several guidance scales (BENCHMARKS.md has its CPU run time); ``--slots`` measures instead whether plain
sampling follows the ``"slots"`` layout rule of the initial noise (:func:`slot_rule`, validation prompts);
``--step-counts 12 15 20 --guidance 5 --prompts 32``: plain accuracy by number of steps (:func:`accuracy_by_steps`);
``--divergence``: at which denoising step the full and the base prompt part ways (:func:`layout_divergence`);
``--coarse-error``: how much of the layout the model reads off the training noise (:func:`coarse_error`).
"""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from research.toy.judge import score_image
from research.toy.scenes import PromptSpec, compose_caption, held_out_prompts, seen_prompts

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_images(
    pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 30, guidance_scale: float = 5.0, chunk: int = 64
) -> list[Image.Image]:
    """Plain sampling, one image per (prompt, seed), each seeded with its own generator."""
    images: list[Image.Image] = []
    gen_device = "cpu"
    for i in range(0, len(prompts), chunk):
        ps = list(prompts[i : i + chunk])
        gens = [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds[i : i + chunk]]
        out = pipe(ps, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens)
        images.extend(out.images)
    return images


def score_prompts(images: Sequence[Image.Image], specs: Sequence[PromptSpec]) -> dict:
    """Object-level and image-level binding accuracy of images for their prompts, plus per-attribute rates."""
    obj, img = [], []
    attr = {"shape": [], "colour": [], "texture": []}
    for im, spec in zip(images, specs, strict=True):
        s = score_image(im, spec.objects)
        obj.extend(s["found"])
        img.append(s["image_correct"])
        from research.toy.judge import judge, match_objects

        seen = judge(im)
        for a in attr:
            attr[a].extend(match_objects(spec.objects, seen, attributes=(a,)).tolist())
    return {
        "n": len(specs),
        "object_accuracy": float(np.mean(obj)) if obj else 0.0,
        "image_accuracy": float(np.mean(img)) if img else 0.0,
        **{f"{a}_accuracy": float(np.mean(v)) if v else 0.0 for a, v in attr.items()},
    }


def base_prompt(spec: PromptSpec) -> str:
    """The prompt with every colour and texture word left out, in the same template ("a circle and a square")."""
    for template in range(4):
        full = compose_caption(spec.objects, template)
        if full == spec.prompt:
            return compose_caption(spec.objects, template, [False] * len(spec.objects), [False] * len(spec.objects))
    raise ValueError(f"not a toy-world caption: {spec.prompt!r}")


def layout_agreement(images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]) -> dict:
    """Foreground IoU of the judged objects of paired images, and how often both show the same number of objects."""
    from research.toy.binding import foreground, iou
    from research.toy.judge import judge

    ious, same_count = [], []
    for a, b in zip(images_a, images_b, strict=True):
        sa, sb = judge(a), judge(b)
        hw = (a.height, a.width)
        ious.append(iou(foreground(sa, hw), foreground(sb, hw)))
        same_count.append(len(sa) == len(sb))
    return {"foreground_iou": float(np.mean(ious)), "same_count": float(np.mean(same_count))}


def evaluate_pipeline(
    pipe,
    n_prompts: int,
    steps: int = 30,
    guidance_scale: float = 5.0,
    grid_path: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Sample ``n_prompts`` held-out and ``n_prompts`` seen 2/3-object prompts (seed = index) and judge them."""
    result = {}
    grid_rows = []
    for name, specs in (("held_out", held_out_prompts(n_prompts, seed)), ("seen", seen_prompts(n_prompts, seed))):
        prompts = [s.prompt for s in specs]
        images = sample_images(pipe, prompts, list(range(len(prompts))), steps, guidance_scale)
        result[name] = score_prompts(images, specs)
        logger.info("%s: %s", name, result[name])
        grid_rows.append((prompts[:8], images[:8]))
        if name == "held_out":  # does the layout follow the noise? the base prompts from the same seeds
            bases = [base_prompt(s) for s in specs]
            base_images = sample_images(pipe, bases, list(range(len(bases))), steps, guidance_scale)
            shuffled = base_images[1:] + base_images[:1]  # other seeds: what unrelated layouts give
            result["layout_vs_base_prompt"] = layout_agreement(images, base_images)
            result["layout_vs_other_seed"] = layout_agreement(images, shuffled)
            logger.info(
                "layout: same seed %s, other seed %s", result["layout_vs_base_prompt"], result["layout_vs_other_seed"]
            )
            grid_rows.append((bases[:8], base_images[:8]))
    if grid_path is not None:
        save_grid(grid_rows, grid_path)
    return result


def save_grid(rows, path: str | Path, caption_height: int = 40) -> None:
    """Rows of (captions, images) as one PNG with each image's caption underneath."""
    w = max(im.width for _, ims in rows for im in ims)
    h = max(im.height for _, ims in rows for im in ims)
    cols = max(len(ims) for _, ims in rows)
    canvas = Image.new("RGB", (cols * w, len(rows) * (h + caption_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (caps, ims) in enumerate(rows):
        for c, (cap, im) in enumerate(zip(caps, ims, strict=True)):
            x, y = c * w, r * (h + caption_height)
            canvas.paste(im, (x, y))
            draw.multiline_text((x + 2, y + h + 1), "\n".join(textwrap.wrap(cap, 22)[:3]), fill="black", spacing=1)
    canvas.save(path)


def layout_by_guidance(pipe, n_prompts: int, guidances: Sequence[float], steps: int = 20, seed: int = 0) -> dict:
    """For each guidance scale: held-out prompts and their base prompts from the same seeds (seed = index), the
    layout agreement of the pairs (and of pairs from different seeds), and the full prompts' binding accuracy."""
    specs = held_out_prompts(n_prompts, seed)
    full = [s.prompt for s in specs]
    bases = [base_prompt(s) for s in specs]
    seeds = list(range(len(specs)))
    out = {}
    for g in guidances:
        a = sample_images(pipe, full, seeds, steps, g)
        b = sample_images(pipe, bases, seeds, steps, g)
        out[str(g)] = {
            "layout_vs_base_prompt": layout_agreement(a, b),
            "layout_vs_other_seed": layout_agreement(a, b[1:] + b[:1]),
            "held_out": score_prompts(a, specs),
        }
        logger.info("guidance %s: %s", g, out[str(g)])
    return out


def accuracy_by_steps(
    pipe, specs: Sequence[PromptSpec], step_counts: Sequence[int], guidance_scale: float = 5.0, seed: int = 1000
) -> dict:
    """Plain-sampling binding accuracy of ``specs`` (seeded ``seed + index``) at each number of denoising steps."""
    seeds = [seed + i for i in range(len(specs))]
    prompts = [s.prompt for s in specs]
    return {
        str(n): score_prompts(sample_images(pipe, prompts, seeds, n, guidance_scale, chunk=32), specs)
        for n in step_counts
    }


def place_of(mask: np.ndarray) -> int:
    """The place of the ``"slots"`` layout (row-major index into the 3 x 3 grid) nearest a region's centre."""
    from research.toy.scenes import IMAGE_SIZE, SLOT_CENTRES

    ys, xs = np.nonzero(mask)
    centres = np.asarray(SLOT_CENTRES) * mask.shape[0] / IMAGE_SIZE
    return int(np.abs(centres - ys.mean()).argmin() * 3 + np.abs(centres - xs.mean()).argmin())


@torch.no_grad()
def slot_rule(
    pipe, specs: Sequence[PromptSpec], steps: int = 20, guidance_scale: float = 7.5, seed: int = 1000, chunk: int = 32
) -> dict:
    """Does plain sampling put the objects where the ``"slots"`` layout rule says, from the initial noise alone?

    For each prompt (seeded ``seed + index``), the initial latent noise ranks the 3 x 3 places
    (:func:`~research.toy.scenes.slot_scores` of its layout field); the full prompt and its base prompt (no colour
    or texture words) are sampled from that noise and judged. Per prompt kind: ``on_top_places`` = share of judged
    objects on the n best places (n objects prompted; ``chance`` = n / 9), ``in_named_order`` = share of prompted
    objects whose shape sits on the place of its rank in the caption (chance 1/9 per object); and ``same_places`` =
    how often the full and the base prompt occupy the same set of places.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from research.toy.judge import judge
    from research.toy.scenes import layout_field_of, slot_scores

    c = pipe.unet.config.in_channels
    h = pipe.unet.config.sample_size
    noise = torch.cat(
        [randn_tensor((1, c, h, h), generator=torch.Generator().manual_seed(seed + i)) for i in range(len(specs))]
    )
    ranks = np.argsort(-slot_scores(layout_field_of(noise).numpy().astype(np.float64)), axis=1, kind="stable")
    places: dict[str, list[list[tuple[int, str]]]] = {}
    stats: dict[str, dict[str, list[float]]] = {}
    for kind in ("full", "base"):
        prompts = [s.prompt if kind == "full" else base_prompt(s) for s in specs]
        images = []
        for i in range(0, len(prompts), chunk):
            out = pipe(
                prompts[i : i + chunk],
                latents=noise[i : i + chunk].clone().to(pipe.device, pipe.unet.dtype),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
            )
            images.extend(out.images)
        places[kind] = [[(place_of(o.mask), o.shape) for o in judge(im)] for im in images]
        top, order = [], []
        for spec, found, rank in zip(specs, places[kind], ranks, strict=True):
            n = len(spec.objects)
            top.extend(p in set(rank[:n].tolist()) for p, _ in found)
            order.extend(
                any(p == rank[k] and shape == o.shape for p, shape in found) for k, o in enumerate(spec.objects)
            )
        stats[kind] = {"on_top_places": top, "in_named_order": order}
    same = [
        sorted(p for p, _ in a) == sorted(p for p, _ in b) for a, b in zip(places["full"], places["base"], strict=True)
    ]
    result = {kind: {k: float(np.mean(v)) if v else 0.0 for k, v in st.items()} for kind, st in stats.items()}
    result["same_places"] = float(np.mean(same)) if same else 0.0
    result["chance"] = {"on_top_places": float(np.mean([len(s.objects) / 9 for s in specs])), "in_named_order": 1 / 9}
    result["n"] = len(specs)
    return result


def foreground_strength(images: torch.Tensor, cells: int = 16) -> torch.Tensor:
    """How far each place of an image is from its background, on a ``cells x cells`` grid: the RGB distance of each
    pixel from the median of the image's border (the judge's background), averaged over each cell. ``images``:
    (B, 3, H, W) in [0, 1]; returns (B, cells * cells)."""
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1
    )  # (B, 3, 4W)
    background = border.median(dim=-1).values[..., None, None]
    distance = (images - background).norm(dim=1, keepdim=True)
    return torch.nn.functional.adaptive_avg_pool2d(distance, cells).flatten(1)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


@torch.no_grad()
def layout_divergence(
    pipe,
    specs: Sequence[PromptSpec],
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 1000,
    second_prompt=base_prompt,
) -> dict:
    """At which denoising step do a prompt and its base prompt, sampled from the same noise, part ways?

    Each prompt (seeded ``seed + index``) and ``second_prompt(spec)`` (default: its base prompt, Detail++'s p1) are
    sampled with plain SDXL sampling; at every step the scheduler's clean-image estimate (``pred_original_sample``)
    is decoded and its :func:`foreground_strength` map compared by correlation: ``full_vs_second[k]`` between the
    two prompts at step k, ``full_vs_final[k]`` between the full prompt's step-k estimate and its final image (how far
    its layout is committed; ``second_vs_final`` the same for the second prompt), and ``other_noise[k]`` between the
    full prompt and the second prompt of the next prompt's noise (what unrelated layouts give). Means over the
    prompts.
    """
    from diffusers.utils.torch_utils import randn_tensor

    c, h = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    noise = torch.cat(
        [randn_tensor((1, c, h, h), generator=torch.Generator().manual_seed(seed + i)) for i in range(len(specs))]
    )
    vae = pipe.vae

    def estimates(prompts: list[str]) -> torch.Tensor:  # (steps, B, cells^2)
        recorded: list[torch.Tensor] = []
        step = pipe.scheduler.step

        def recording_step(*args, **kwargs):
            out = step(*args, **kwargs)
            recorded.append(out.pred_original_sample if hasattr(out, "pred_original_sample") else out[1])
            return out

        pipe.scheduler.step = recording_step
        try:
            pipe(
                prompts,
                latents=noise.clone().to(pipe.device, pipe.unet.dtype),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                output_type="latent",
                return_dict=True,
            )
        finally:
            del pipe.scheduler.step  # back to the class's method
        if len(recorded) != steps:
            raise RuntimeError(f"the scheduler's step ran {len(recorded)} times for {steps} steps")
        maps = []
        for x0 in recorded:
            latents = x0.to(vae.dtype) / vae.config.scaling_factor
            images = (vae.decode(latents).sample.float().clamp(-1, 1) + 1) / 2
            maps.append(foreground_strength(images.cpu()))
        return torch.stack(maps)

    full = estimates([s.prompt for s in specs])
    second = estimates([second_prompt(s) for s in specs])
    shifted = second.roll(-1, dims=1)
    result = {
        "n": len(specs),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "full_vs_second": [float(_correlation(f, b).mean()) for f, b in zip(full, second, strict=True)],
        "full_vs_final": [float(_correlation(f, full[-1]).mean()) for f in full],
        "second_vs_final": [float(_correlation(b, second[-1]).mean()) for b in second],
        "other_noise": [float(_correlation(f, b).mean()) for f, b in zip(full, shifted, strict=True)],
    }
    return result


@torch.no_grad()
def coarse_error(pipe, n: int = 48, timesteps: Sequence[int] = (999, 900, 700), seed: int = 0) -> dict:
    """How much of the layout does the model read off the noise? The training loss's view, no sampling.

    ``n`` slots-world scenes (2 or 3 objects, ``seed``) are noised at each timestep with noise that carries the
    scene's own layout field (``matched``: the noise the layout was chosen from, as in training) or the next scene's
    (``mismatched``; the same residuals, only the field differs); the value is
    :func:`~research.toy.train.layout_loss` (the coarse x0 error) of the model's prediction, averaged over the scenes.
    A model that reads its layout off the noise has a far smaller matched error.
    """
    from research.toy.scenes import CaptionTokenizer, noise_with_layout_field, render, sample_scenes
    from research.toy.training.objectives import encode_text, layout_loss

    device = pipe.device
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batch = sample_scenes(n, seed, n_objects=(0.0, 0.5, 0.5), layout="slots")
    images, _ = render(batch, device, image_size=size)
    tok = CaptionTokenizer(pipe.tokenizer)
    ids1 = torch.as_tensor(tok(batch.captions), device=device)
    ids2 = torch.as_tensor(tok(batch.captions, pad_id=0), device=device)
    dtype = pipe.unet.dtype
    vae = pipe.vae
    z0 = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    ehs, pooled = encode_text(pipe.text_encoder, pipe.text_encoder_2, ids1, ids2)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype).expand(n, -1)
    abar = pipe.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    fields = {"matched": batch.layout_field, "mismatched": np.roll(batch.layout_field, 1, axis=0)}
    result: dict = {"n": n, "seed": seed}
    for t in timesteps:
        tt = torch.full((n,), int(t), device=device)
        a = abar[tt].view(n, 1, 1, 1)
        row = {}
        for name, field in fields.items():
            gen = torch.Generator(device).manual_seed(seed + int(t))  # same residuals for both fields
            noise = noise_with_layout_field(field, z0.shape, gen, device)
            zt = (a.sqrt() * z0 + (1 - a).sqrt() * noise).to(dtype)
            pred = pipe.unet(
                zt, tt, ehs.to(dtype), added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids}
            ).sample
            row[name] = float(layout_loss(pred, noise, abar[tt]).mean())
        result[str(int(t))] = row
    return result


def main(argv: list[str] | None = None) -> dict:
    from diffusers import StableDiffusionXLPipeline

    from detailpp.models.loading import TOY_MODEL_DIR, packaged_tokenizers

    p = argparse.ArgumentParser(description="Does the toy model's layout follow the noise? (plain sampling)")
    p.add_argument("--model", default=None, help="pipeline folder (default: the packaged toy model)")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, nargs="+", default=[7.5])
    p.add_argument("--slots", action="store_true", help="instead: does the layout follow the slots rule? (slot_rule)")
    p.add_argument("--step-counts", type=int, nargs="+", help="instead: plain accuracy at these step counts")
    p.add_argument("--divergence", action="store_true", help="instead: where full and base prompt part ways")
    p.add_argument("--coarse-error", action="store_true", help="instead: the coarse x0 error, own vs other noise")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    folder = a.model or TOY_MODEL_DIR
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), **packaged_tokenizers(folder)).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    from research.toy.binding import validation_prompts

    if a.coarse_error:
        result = coarse_error(pipe, a.prompts)
    elif a.divergence:
        result = layout_divergence(pipe, validation_prompts(a.prompts), a.steps, a.guidance[0])
    elif a.slots:
        result = slot_rule(pipe, validation_prompts(a.prompts), a.steps, a.guidance[0])
    elif a.step_counts:
        result = accuracy_by_steps(pipe, validation_prompts(a.prompts), a.step_counts, a.guidance[0])
    else:
        result = layout_by_guidance(pipe, a.prompts, a.guidance, a.steps)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
