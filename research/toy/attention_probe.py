"""Do the toy model's cross-attention maps localise the prompted objects? (A check for Detail++'s subject masks.)

Plain diffusers sampling with recording processors on the cross-attention (``attn2``) layers whose query has a
chosen number of tokens (16 x 16 by default: ``down_blocks.2``, ``mid_block``, ``up_blocks.0`` at 128 x 128 images).
For each prompted object, the map of its shape word's token (averaged over heads, layers, the conditional half and
all steps, as Detail++ does) is min-max normalised, thresholded at ``tau`` and compared with the region the judge
finds for that object: IoU, and whether the map's peak falls inside the object.

    python -m research.toy.attention_probe --n 8 --out outputs/attn.png
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from research.toy.judge import judge
from research.toy.scenes import held_out_prompts

logger = logging.getLogger(__name__)


class RecordingProcessor:
    """Cross-attention with explicit probabilities; appends the conditional half's head-mean to ``store``."""

    def __init__(self, store: list) -> None:
        self.store = store

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(q, k, None)  # (b * heads, n, tokens)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        p = probs.view(b, attn.heads, n, -1).mean(1)
        self.store.append(p[b // 2 :] if b > 1 else p)
        return out


def layers_with_tokens(unet, tokens: int, image_latent: int) -> list[str]:
    """Names of ``attn2`` layers whose query has ``tokens`` tokens at a latent of ``image_latent`` pixels a side."""
    names = []
    for name in unet.attn_processors:
        if ".attn2." not in name:
            continue
        block = name.split(".")[0]
        if block == "mid_block":
            level = len(unet.config.block_out_channels) - 1
        else:
            i = int(name.split(".")[1])
            level = i if block == "down_blocks" else len(unet.config.block_out_channels) - 1 - i
        if (image_latent // 2**level) ** 2 == tokens:
            names.append(name)
    return names


@torch.no_grad()
def probe(
    pipe, specs, steps: int = 20, guidance_scale: float = 7.5, tau: float = 0.5, tokens: int = 256, seed: int = 0
) -> tuple[dict, list]:
    """Sample each prompt once and score its objects' shape-token maps against the judge's regions."""
    unet = pipe.unet
    latent = unet.config.sample_size
    names = layers_with_tokens(unet, tokens, latent)
    if not names:
        raise ValueError(f"no cross-attention layer has {tokens} tokens")
    store: list = []
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({k: (RecordingProcessor(store) if k in names else v) for k, v in saved.items()})
    try:
        prompts = [s.prompt for s in specs]
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens).images
    finally:
        unet.set_attn_processor(saved)
    if len(store) != steps * len(names):
        raise RuntimeError(f"recorded {len(store)} maps, expected {steps * len(names)}: a hook did not fire")
    maps = torch.stack(store).float().mean(0)  # (B, tokens, 77)
    side = int(round(tokens**0.5))
    rows, ious, hits, n_objects, n_found, records = [], [], [], 0, 0, []
    for i, spec in enumerate(specs):
        ids = pipe.tokenizer(spec.prompt).input_ids
        seen = judge(images[i])
        overlay = []
        for obj in spec.objects:
            n_objects += 1
            tok = pipe.tokenizer(obj.shape, add_special_tokens=False).input_ids[0]
            # the object's own shape word: the k-th occurrence for the k-th object of that shape
            k = [o.shape for o in spec.objects[: spec.objects.index(obj)]].count(obj.shape)
            pos = [j for j, t in enumerate(ids) if t == tok][k]
            m = maps[i, :, pos].view(1, 1, side, side)
            m = F.interpolate(m, size=images[i].size[::-1], mode="bilinear", align_corners=False)[0, 0].numpy()
            m = (m - m.min()) / max(m.max() - m.min(), 1e-8)
            overlay.append(m)
            match = [s for s in seen if s.shape == obj.shape and s.colour == obj.colour] or [
                s for s in seen if s.shape == obj.shape
            ]
            if not match:
                continue
            n_found += 1
            region = match[0].mask
            binary = m > tau
            ious.append(float((binary & region).sum() / max((binary | region).sum(), 1)))
            peak = np.unravel_index(np.argmax(m), m.shape)
            hits.append(bool(region[peak]))
            records.append(
                {
                    "prompt": spec.prompt,
                    "object": spec.objects.index(obj),
                    "n_objects": len(spec.objects),
                    "iou": ious[-1],
                    "peak_inside": hits[-1],
                }
            )
        rows.append((images[i], overlay, spec.prompt))
    result = {
        "layers": names,
        "n_prompts": len(specs),
        "n_objects": n_objects,
        "n_objects_with_judged_region": n_found,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "peak_inside_rate": float(np.mean(hits)) if hits else None,
        "tau": tau,
        "by_position": {
            f"{n}-object prompts, object {j + 1}": {
                "n": len(sel),
                "mean_iou": float(np.mean([r["iou"] for r in sel])),
                "peak_inside_rate": float(np.mean([r["peak_inside"] for r in sel])),
            }
            for n in (1, 2, 3)
            for j in range(n)
            if (sel := [r for r in records if r["n_objects"] == n and r["object"] == j])
        },
        "objects": records,
    }
    return result, rows


def save_overlays(rows, path: str | Path) -> None:
    """Each row: the image, then each object's map (red over the greyed image)."""
    tiles = []
    for img, maps, _ in rows:
        base = np.asarray(img).astype(np.float32) / 255
        row = [base]
        for m in maps:
            grey = base.mean(-1, keepdims=True).repeat(3, -1) * 0.5
            row.append(np.clip(grey + np.stack([m, m * 0.2, m * 0.2], -1) * 0.8, 0, 1))
        while len(row) < 4:
            row.append(np.ones_like(base))
        tiles.append(np.concatenate(row, 1))
    Image.fromarray((np.concatenate(tiles, 0) * 255).astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> dict:
    from diffusers import StableDiffusionXLPipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the packaged toy model)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--out", default=None, help="PNG of the maps")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from detailpp.models.loading import TOY_MODEL_DIR, packaged_tokenizers

    folder = a.model or TOY_MODEL_DIR
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), **packaged_tokenizers(folder))
    pipe.set_progress_bar_config(disable=True)
    result, rows = probe(pipe, held_out_prompts(a.n, seed=1), a.steps, a.guidance_scale, a.tau)
    if a.out:
        save_overlays(rows, a.out)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
